"""What `dalle2 serve` allows, in one place (light: the CLI reads it for its option defaults).
Every way in (the API, the page, gradio's own routes) enforces the same numbers."""

MAX_UPLOAD = 4 * 2**20  # bytes per image, as OpenAI's Images API
MAX_BODY = 2 * MAX_UPLOAD + 64 * 2**10  # a request: up to two images and a few short fields
MAX_PER_REQUEST = 10  # images per request, as OpenAI's Images API allows
MAX_PROMPT = 1000  # characters, as OpenAI's dall-e-2
MAX_STEPS = 250  # steps a request may ask of each stage, by default (DDPM's 1000 is the operator's to allow)
READ_TIMEOUT_S = 30.0  # for a request to arrive whole (head and body)
KEEP_ALIVE_S = 5.0  # an idle connection between requests (uvicorn's own default)
MAX_CONNECTIONS = 256
SHUTDOWN_TIMEOUT_S = 5.0  # running work's grace period when the server is stopped

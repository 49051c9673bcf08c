"""`dalle2 serve`: the models kept loaded behind OpenAI's Images API (api.py) and a web page
(web.py), both feeding one batcher (batcher.py) through the ImageService (service.py)."""

"""`dalle2 serve`: the models loaded once, behind OpenAI's Images API and a web page."""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from dalle2_cli.cli.app import app
from dalle2_cli.cli.groups import command
from dalle2_cli.cli.guard import Terminated, say
from dalle2_cli.cli.options import MODEL, ModelChoice
from dalle2_cli.cli.report import Report, report
from dalle2_cli.errors import Dalle2Error, InputError
from dalle2_cli.serve.limits import MAX_CONNECTIONS, MAX_STEPS, READ_TIMEOUT_S, SHUTDOWN_TIMEOUT_S

API_KEY_ENV = "DALLE2_API_KEY"


def _needs_serve_extra() -> None:
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "multipart", "gradio") if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(
            f"dalle2 serve needs {', '.join(missing)}: pip install 'dalle2-cli[serve]' (fastapi, uvicorn, "
            "python-multipart, gradio)"
        )


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is our one-line error."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        raise InputError(f"cannot listen on {host}:{port} ({error.strerror or error}): give another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


# Longer than 60 lines only by its options' declarations (typer reads them from the signature).
@command(app, MODEL, report("what the server did, when it stops", quiet=True))
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free one).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", help=f"Require this key (env {API_KEY_ENV}): API calls as a bearer token."),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most images sampled together.")] = 8,
    batch_window_ms: Annotated[
        float, typer.Option("--batch-window-ms", help="How long a request waits for others to share its batch.")
    ] = 50.0,
    queue_size: Annotated[
        int, typer.Option("--queue-size", help="Requests that may wait; more are answered 429.")
    ] = 64,
    max_steps: Annotated[
        int, typer.Option("--max-steps", help="Most sampling steps a request may ask of each stage (more: 400).")
    ] = MAX_STEPS,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where images are written (and served from).")
    ] = Path("served"),
    page: Annotated[bool, typer.Option("--page/--no-page", help="Serve the web page at /.")] = True,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            metavar="NAME",
            help="Also answer to this Host name (repeat for more; * for any). Bound to loopback, only "
            "loopback names are answered by default; bound to a network, any.",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            metavar="ORIGIN",
            help="Let web pages of this origin (https://app.example) call the server from a browser (repeat for "
            "more; * for any). Other sites' browser requests are refused.",
        ),
    ] = None,
    read_timeout: Annotated[
        float, typer.Option("--read-timeout", help="Seconds a request has to arrive whole; slower ones are cut off.")
    ] = READ_TIMEOUT_S,
    max_connections: Annotated[
        int, typer.Option("--max-connections", help="Open connections at most; more are answered 503.")
    ] = MAX_CONNECTIONS,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout",
            help="On SIGTERM or Ctrl-C: seconds running work may take to finish before it is cancelled at its next "
            "step (a second signal: at once).",
        ),
    ] = SHUTDOWN_TIMEOUT_S,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            help="Batches sampled at once on this device, sharing its models and splitting --threads between them.",
        ),
    ] = 1,
    devices: Annotated[
        str | None,
        typer.Option(
            "--devices",
            metavar="LIST",
            help="One worker per device, each with its own copy of the models: cuda:0,cuda:1 (each batch runs on "
            "the first free one).",
        ),
    ] = None,
    record_paths: Annotated[
        bool,
        typer.Option(
            "--record-paths", help="Record the config's and model files' paths in served images (default: names only)."
        ),
    ] = False,
    *,
    model: ModelChoice,
    report: Report,
) -> None:
    """Serve the models: OpenAI's Images API at /v1 and a web page at /.

    Every way in (API, page, gradio's own routes) takes requests of at most 8 MB (images of
    4 MB and 89 megapixels, prompts of 1000 characters, 10 images, --max-steps steps a stage).
    """
    _needs_serve_extra()
    from dalle2_cli.cli.generate import apply_threads
    from dalle2_cli.config import load_config
    from dalle2_cli.serve.api import create_app
    from dalle2_cli.serve.gate import allowed_hosts
    from dalle2_cli.serve.server import Server
    from dalle2_cli.serve.service import ImageService

    _check_limits(read_timeout, max_connections, shutdown_timeout)
    per_worker = _worker_devices(workers, devices, model)
    key = api_key or os.environ.get(API_KEY_ENV) or None
    # What the API calls the model: the config's name, or its file's name without ".json".
    name = Path(model.config).stem if model.config.endswith(".json") else model.config
    config = load_config(model.config)  # a bad config stops here, before anything listens
    apply_threads(model)

    load = _loader(config, model, report, per_worker)
    service = ImageService(
        load,
        output_dir,
        max_batch,
        batch_window_ms / 1000,
        queue_size,
        name=name,
        log=report.info,
        max_steps=max_steps,
        record_paths=record_paths,
        workers=len(per_worker),
        threads_per_worker=_threads_per_worker(model, per_worker),
    )
    hosts = allowed_hosts(host, allowed_host or ())
    api = create_app(service, key, log=report.info, hosts=hosts, cors_origins=cors_origin or (), debug=report.debug)
    if page:
        from dalle2_cli.serve.web import mount_page

        api = mount_page(api, service, key)
    listener = _listen(host, port)
    bound = listener.getsockname()[1]
    server = Server(
        api,
        service,
        read_timeout_s=read_timeout,
        max_connections=max_connections,
        shutdown_timeout_s=shutdown_timeout,
    )

    shown = f"[{host}]" if ":" in host else host
    # Always said, --quiet or not: where to reach it (with --port 0, the only way to know).
    say(f"dalle2 serve: http://{shown}:{bound} (API at /v1{', page at /' if page else ''}); loading models")
    if key is None and hosts is None:
        report.warning(f"listening on {host} without --api-key: anyone who can reach it may use it")
    threading.Thread(target=_start, args=(service, server), name="dalle2-load", daemon=True).start()
    try:
        server.run(sockets=[listener])
    except (KeyboardInterrupt, Terminated):
        pass  # Ctrl-C and SIGTERM are how a server is stopped: uvicorn has stopped taking requests
    finally:
        if not server.finish():
            report.warning("the running batch did not stop in time: leaving it (no image of it is saved)")
        listener.close()
    if service.failure:
        raise InputError(f"the models did not load: {service.failure}")
    batcher = service.batcher
    report.info(f"dalle2 serve: stopped after {batcher.jobs_done} requests in {batcher.batches} batches")
    if report.json:
        report.print_json({"url": f"http://{shown}:{bound}", "requests": batcher.jobs_done, "batches": batcher.batches})


def _check_limits(read_timeout: float, max_connections: int, shutdown_timeout: float) -> None:
    if not read_timeout > 0:
        raise InputError(f"--read-timeout {read_timeout:g}: give a number of seconds above 0")
    if max_connections < 1:
        raise InputError(f"--max-connections {max_connections}: give 1 or more")
    if not shutdown_timeout >= 0:
        raise InputError(f"--shutdown-timeout {shutdown_timeout:g}: give a number of seconds, 0 or more")


def _worker_devices(workers: int, devices: str | None, model: ModelChoice) -> list[str | None]:
    """Each worker's device: --devices' list, or --workers times --device's (None: shared)."""
    if devices is None:
        if not 1 <= workers <= 64:
            raise InputError(f"--workers {workers}: give 1 to 64")
        if workers > 1 and model.low_memory:
            raise InputError("--workers with --low-memory: workers share the models, which --low-memory moves")
        return [None] * workers
    if workers != 1 or model.device is not None:
        raise InputError("--devices names every worker's device: leave out --workers and --device")
    listed = [name.strip() for name in devices.split(",") if name.strip()]
    if not listed or len(set(listed)) != len(listed):
        raise InputError(f"--devices {devices!r}: give distinct devices, comma-separated (cuda:0,cuda:1)")
    return listed


def _threads_per_worker(model: ModelChoice, per_worker: list[str | None]) -> int | None:
    """CPU workers split the threads (--threads, else torch's count) between them."""
    if len(per_worker) == 1 or per_worker[0] is not None:
        return None
    import torch

    return max(1, (model.threads or torch.get_num_threads()) // len(per_worker))


def _loader(config: Any, model: ModelChoice, report: Report, per_worker: list[str | None]) -> Any:
    """`load(worker)`: workers with a device of their own get their own models; others share one."""
    from dalle2_cli.loading.manager import DalleModelManager

    def load(device: str | None) -> Any:
        options = model.manager_options() | ({"device": device} if device is not None else {})
        return DalleModelManager(config, name=model.config, log=report.info, warn=report.warning, **options)

    shared = functools.cache(lambda: load(None))
    return lambda worker: shared() if per_worker[worker] is None else load(per_worker[worker])


def _start(service: Any, server: Any) -> None:
    """Load the models while the server already answers /health (503 until they are loaded);
    a failure stops the server, and `serve` reports it."""
    try:
        service.start()
    except Dalle2Error as error:
        service.failure = str(error)
    except Exception as error:  # noqa: BLE001 - reported as one line; the server stops
        service.failure = f"{type(error).__name__}: {error}"
    if service.failure:
        server.should_exit = True

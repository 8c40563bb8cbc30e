"""Load the model once, start the scheduler thread, serve with uvicorn; on SIGTERM or Ctrl-C stop
accepting, let in-flight answers finish for up to --shutdown_timeout seconds, cancel the rest,
and return (the CLI exits 0)."""

from __future__ import annotations

import signal
from pathlib import Path

from phitune import ui
from phitune.errors import OptionError
from phitune.serve.options import ServeOptions


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def base_id(model_dir: Path, name: str | None) -> str:
    """The base model's id: --model_name, else the auto-opt output's directory name
    (D for D/model)."""
    if name:
        return name
    return (model_dir.parent if model_dir.name == "model" else model_dir).name or "base"


def run(options: ServeOptions) -> None:
    from phitune.infer.adapters import plan
    from phitune.infer.chat import resolve
    from phitune.infer.session import Session
    from phitune.serve.app import ServeConfig, build_app
    from phitune.serve.scheduler import Scheduler

    model_dir = resolve(options.model, "serve")
    check_port(options.host, options.port)
    adapters, _ = plan(model_dir, options.adapter, None, options.no_adapter)
    base = base_id(model_dir, options.model_name)
    if base in {a.name for a in adapters}:
        raise OptionError(f"the base model and an adapter are both named '{base}'", "--model_name",
                          "name the base apart with --model_name, or the adapter with PATH=NAME")
    if options.host not in LOOPBACK:
        ui.info(f"[yellow]warning:[/yellow] listening on {options.host}: other machines can reach "
                "this server" + ("" if options.api_key else " and no --api_key is set"))
    # the tokenizer only: the scheduler loads the weights once, in its batched session or
    # (a graph it cannot batch) og's
    session = Session(model_dir, adapters, None, weights=False)
    scheduler = Scheduler(session, options.parallel, options.max_queue)
    config = ServeConfig(base, [a.name for a in adapters], options.api_key,
                         options.max_body_kb * 1024, options.max_tokens)
    app = build_app(session, scheduler, config)
    scheduler.start()
    ui.info(f"serving {model_dir} on http://{_url_host(options.host)}:{options.port}/v1")
    ui.info(f"models: {', '.join([base, *config.adapters])}; {options.parallel} decode at once, "
            f"{options.max_queue} may wait")
    try:
        _server(app, options, scheduler).run()
    finally:
        scheduler.close(options.shutdown_timeout)
    ui.info("stopped" + (f": {scheduler.cut} answer(s) still running at --shutdown_timeout "
                         "were cancelled" if scheduler.cut else ""))


def check_port(host: str, port: int) -> None:
    """Refuse a port already taken in one line (uvicorn would log and exit 1 after the model
    load)."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OptionError(f"cannot listen on {host}:{port} ({exc.strerror})", "--port",
                              "pick a free port, or stop what holds this one") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _server(app, options: ServeOptions, scheduler):
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn re-raises a caught SIGTERM after its graceful shutdown, which would end
            # the process with -15; a server asked to stop has done its job: exit 0.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop now
            elif not self.should_exit:
                # uvicorn stops accepting and waits for open requests; the scheduler lets the
                # running answers finish within the bound and cancels the rest, which ends
                # their requests with a response (503 or a closed stream), not a killed task.
                threading.Thread(target=scheduler.close, args=(options.shutdown_timeout,),
                                 daemon=True).start()
            self.should_exit = True

    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            access_log=False, lifespan="off",
                            # a backstop only: the scheduler ends every answer before this
                            timeout_graceful_shutdown=int(options.shutdown_timeout) + 5,
                            h11_max_incomplete_event_size=options.max_body_kb * 1024 + 65536)
    return Server(config)

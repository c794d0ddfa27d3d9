"""`largen serve` / `largen-serve`: check the options, load the models once, serve the app with uvicorn.

Every bad option is one line `largen: error: ...` and exit status 2 before anything is served
(a port in use included: the socket is bound here, then handed to uvicorn).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from inference import cli
from inference.cli import CLIError

TOKEN_ENV = "LARGEN_TOKEN"


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise CLIError(f"--host {host!r} is not an address of this machine ({err.strerror})") from err
    family, _, _, _, address = infos[0]
    # proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted connections only
    # when the listening socket says TCP, and without it every keep-alive response waited ~40 ms
    # for the client's delayed ACK (measured: 44 ms vs 1 ms for GET /healthz).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise CLIError(f"cannot listen on --host {host!r} --port {port}: {err.strerror or err}") from err
    sock.listen(128)
    return sock


def build_app(args: argparse.Namespace):
    """Check `args` and load the models; returns (app, settings). Raises CLIError for bad options."""
    from serving.app import ServeSettings, create_app

    model = args.model or os.environ.get(cli.MODEL_ENV)
    if not model:
        raise CLIError(f"no model: pass --model DIR|HUBID or set ${cli.MODEL_ENV}")
    device = cli.check_device(args.device)
    model_ref = cli.check_model(model)
    masker = None
    if args.profile:
        from dataengine.models import ModelLoadError
        from dataengine.typed_config import ConfigError
        from serving.masks import DEFAULT_CONFIG, Masker

        config = args.config or DEFAULT_CONFIG
        if not os.path.isfile(config):
            raise CLIError(f"--config {str(config)!r} is not a file" if args.config else
                           f"--profile needs pipelines.yaml, which is not at {str(config)!r}: pass --config PATH")
        try:
            masker = Masker.from_profile(args.profile, config, device=device)
        except (ConfigError, ModelLoadError) as err:
            raise CLIError(f"--profile {args.profile!r}: {str(err).splitlines()[0]}") from err
    elif args.config:
        raise CLIError("--config needs --profile (it holds the profiles of the mask models)")
    pipe = cli.load_pipeline(model_ref, model, show_bars=sys.stderr.isatty())
    cli.check_steps(pipe, args.steps)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    settings = ServeSettings(
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        default_steps=args.steps,
        device=device,
    )
    return create_app(pipe, settings, masker), settings


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; returns the exit status.

    Raises:
        CLIError: a bad option (reported by `inference.cli.main` as one line, exit status 2).
    """
    import uvicorn

    sock = _bind(args.host, args.port)  # first: a taken port fails in a second, not after the model load
    try:
        app, settings = build_app(args)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.token:
            print(f"largen: warning: serving on {args.host} without --token: anyone who can reach it can use it",
                  file=sys.stderr)
        print(f"largen: serving the editor on http://{shown}:{port}/ and the API docs on http://{shown}:{port}/docs",
              file=sys.stderr, flush=True)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `largen-serve` (the same as `largen serve`)."""
    return cli.main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

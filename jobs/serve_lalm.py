"""Serve the offline stand-in LALM (OpenAI-compatible) on 127.0.0.1 until interrupted.

    python jobs/serve_lalm.py --port 8000 [--latency-s 0.1] [--fail-rate 0.2] [--api-key-env KEY_VAR]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def run() -> None:
    import argparse
    import time
    from mifuse_ray.demo.lalm_server import BackgroundServer, ServerConfig
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless you mean otherwise)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--latency-s", type=float, default=0.0)
    p.add_argument("--latency-jitter-s", type=float, default=0.0)
    p.add_argument("--rate-limit-qps", type=float, default=0.0)
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--no-n", action="store_true", help="reject n > 1 like some hosted APIs")
    p.add_argument("--benchmark", action="store_true", help="hash-derived scores, no feature extraction")
    p.add_argument("--api-key-env", default="", help="require the key held in this environment variable")
    args = p.parse_args()
    key = os.environ.get(args.api_key_env, "") if args.api_key_env else ""
    server = BackgroundServer(ServerConfig(host=args.host, port=args.port, latency_s=args.latency_s,
                                           latency_jitter_s=args.latency_jitter_s, rate_limit_qps=args.rate_limit_qps,
                                           fail_rate=args.fail_rate, supports_n=not args.no_n,
                                           benchmark=args.benchmark, api_key=key)).start()
    print(f"stand-in LALM at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    from mifuse_ray.cli import main
    main(run)

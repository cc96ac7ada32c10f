"""What every job shares: config options, logging, and one clear line for user errors."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .config import ConfigError, MiFuseConfig
from .overrides import add_config_arguments, config_from_args


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, usage="%(prog)s [--config FILE] [--section.field VALUE ...]",
                                epilog="Every config field above can be set as --section.field VALUE, in the --config "
                                "YAML file (nested mappings) or in a Tune search space, by the same dotted name; "
                                "examples in configs/.")
    p.add_argument("--config", help="YAML file with settings (dotted names as nested mappings)")
    add_config_arguments(p)
    return p


def parse_config(p: argparse.ArgumentParser, argv=None) -> tuple[MiFuseConfig, argparse.Namespace]:
    args = p.parse_args(argv)
    return config_from_args(args), args


def user_errors() -> tuple[type[BaseException], ...]:
    from .label_set import LabelSetMismatch
    from .lalm.client import LALMAuthError
    return (ConfigError, LabelSetMismatch, FileNotFoundError, ConnectionError, LALMAuthError, PermissionError)


def main(run) -> None:
    """Run ``run()``; a mistake the user can fix ends in one line, not a traceback."""
    logging.basicConfig(level=os.environ.get("MIFUSE_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)
    # Emitted inside Ray Data's own ExecutionOptions, whatever options a caller passes.
    warnings.filterwarnings("ignore", message=".*exclude_resources.*")
    try:
        run()
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume (finished work is reused)", file=sys.stderr)
        sys.exit(130)

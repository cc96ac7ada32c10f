"""The console a person sees: Ray's own logs go to a file unless --verbose (no cluster needed)."""
import logging
import warnings

import pytest


@pytest.fixture
def restored_logging():
    """quiet_ray changes process-wide loggers: put them back for the tests that follow. Warnings
    capture starts off, as in a fresh job: an earlier test in the session may have left it on while
    pytest's per-test warning recorder put back the original ``warnings.showwarning``."""
    logging.captureWarnings(False)
    names = ("ray", "ray.data", "py.warnings")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in names}
    yield
    logging.captureWarnings(False)
    for n, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(n)
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)


def test_ray_data_plans_and_library_warnings_go_to_the_file(tmp_path, capfd, restored_logging):
    import ray.data  # noqa: F401  (as in a job: Ray Data gives "ray.data" a console handler of its own)
    from mifuse_ray.console import quiet_ray
    path = quiet_ray(str(tmp_path / "logs"), verbose=False)
    capfd.readouterr()
    logging.getLogger("ray.data._internal.execution.streaming_executor").info("Execution plan of Dataset d_0")
    logging.getLogger("ray.train").warning("a Train warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("`exclude_resources` is deprecated", DeprecationWarning)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    written = open(path).read()
    assert "Execution plan of Dataset d_0" in written and "a Train warning" in written
    assert "exclude_resources` is deprecated" in written
    # Ray Data keeps its own session log handler; only its console handler is replaced
    assert not any(type(h) is logging.StreamHandler for h in logging.getLogger("ray.data").handlers)


def test_verbose_leaves_the_console_alone(tmp_path, restored_logging):
    from mifuse_ray.console import quiet_ray
    before = list(logging.getLogger("ray.data").handlers)
    assert quiet_ray(str(tmp_path / "logs"), verbose=True) is None
    assert logging.getLogger("ray.data").handlers == before and not (tmp_path / "logs").exists()


def test_native_log_lines_go_to_the_file_and_the_rest_to_the_console(tmp_path):
    """Ray's C++ core worker writes to fd 2 from inside the driver: its lines go to Ray's log file,
    any other line written to fd 2 and Python's own stderr (a user's error line) to the console."""
    import subprocess
    import sys
    log = tmp_path / "ray.log"
    code = (f"import os, sys\nfrom mifuse_ray.console import divert_native_logs\ndivert_native_logs({str(log)!r})\n"
            "os.write(2, b'[2026-12-04 20:01:12,374 E 2647 2647] core_worker.cc:2465: Actor has constructor "
            "arguments in the object store\\n')\n"
            "os.write(2, b'a line of some other library\\n')\n"
            "print('error: what to change', file=sys.stderr)\nsys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert sorted(proc.stderr.splitlines()) == ["a line of some other library", "error: what to change"]
    assert "core_worker.cc:2465" in log.read_text() and "other library" not in log.read_text()


def test_help_lists_every_config_field_with_its_documentation():
    """`jobs/adapt.py --help` shows every field of the config tree once, each with a line of help
    (the comment that documents the field in config.py)."""
    import dataclasses
    import typing

    from mifuse_ray.cli import parser
    from mifuse_ray.config import MiFuseConfig

    def fields(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from fields(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    actions = {a.option_strings[0][2:]: a for a in parser("adapt")._actions if a.option_strings}
    names = list(fields(MiFuseConfig))
    assert len(names) > 100 and set(names) <= set(actions)
    for name in names:
        text = actions[name].help.split(" (default:")[0].split("(one of")[0].strip()
        assert len(text) >= 8, (name, actions[name].help)
    assert "--train.head_lr" in parser("adapt").format_help()

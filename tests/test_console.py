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

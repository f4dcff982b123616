"""A wrong ray.address fails in seconds with one line naming it, instead of Ray's own minutes of retries.

No test here connects to, or starts, a Ray cluster: every address is checked before ray.init would run, and the
one test that reaches ray.init replaces it.
"""

import socket
import time

import pytest

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.config.loader import build_config
from tgdpo_ray.runtime import ray_start

# On today's Ray a bad address retries for about two minutes: fail the test long before that.
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Another test in the same process may have started Ray; start_ray must still check the address.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def config_with(address):
    return build_config({"data": {"train": "x.jsonl"}, "policy": {"model": "m"}, "loss": {"type": "dpo"},
                         "ray": {"address": address}}, check_paths=False)


def free_port() -> int:
    """A local port on which nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ray_error(config) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        ray_start.start_ray(config)
    return str(info.value), time.monotonic() - started


@pytest.mark.parametrize("form", ["localhost:{port}", "127.0.0.1:{port}", "ray://localhost:{port}"])
def test_nothing_listening_fails_at_once_naming_the_address(form):
    address = form.format(port=free_port())
    message, seconds = start_ray_error(config_with(address))
    assert seconds < 5 and "\n" not in message
    assert message.startswith(f"ray.address {address!r}: ") and "connection refused" in message.lower()


def test_an_address_that_never_answers_fails_after_the_connect_timeout(monkeypatch):
    # A listener whose backlog is full drops new connections unanswered, as a firewall or a dead host does.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port), timeout=1)
    monkeypatch.setattr(ray_start, "RAY_CONNECT_TIMEOUT_S", 1.0)
    try:
        message, seconds = start_ray_error(config_with(f"127.0.0.1:{port}"))
    finally:
        queued.close()
        listener.close()
    assert seconds < 5 and "\n" not in message
    assert message.startswith(f"ray.address '127.0.0.1:{port}': ") and "no answer within 1 s" in message


def test_unknown_host_and_malformed_address():
    message, seconds = start_ray_error(config_with("no-such-host.invalid:6379"))
    assert seconds < 10 and message.startswith("ray.address 'no-such-host.invalid:6379': cannot resolve host")
    message, _ = start_ray_error(config_with("10.0.0.1"))
    assert message.startswith("ray.address '10.0.0.1': ") and "host:port" in message


def test_ray_address_from_the_environment_is_named(monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    message, _ = start_ray_error(config_with(None))
    assert message.startswith(f"RAY_ADDRESS {address!r}: ")
    message, _ = start_ray_error(config_with("auto"))  # Ray lets RAY_ADDRESS replace "auto" too
    assert message.startswith(f"RAY_ADDRESS {address!r}: ")


def test_ray_init_failure_becomes_one_line(monkeypatch):
    import ray

    # "auto" is found by Ray itself (the last `ray start` on this machine): its failure, made one line.
    def failing_init(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify the one to connect to.")

    monkeypatch.setattr(ray, "init", failing_init)
    message, _ = start_ray_error(config_with("auto"))
    assert message == ("ray.address 'auto': cannot connect to the Ray cluster: Could not find any running Ray "
                       "instance. Please specify the one to connect to.")

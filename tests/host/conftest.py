"""Host tier: tests against a real ComfyUI checkout named by COMFYUI_PATH (skipped when it is unset).

Session fixtures: ComfyUI imported in-process with this pack loaded through its custom-node loader
(`comfy_host`), tiny random-weight SD1.5 and SDXL checkpoints built at test time (`tiny_checkpoint`,
`tiny_sdxl_checkpoint`), a `main.py --cpu` subprocess with a client (`comfy_client`), and `runner`, which
parametrizes a test over both transports (serverless and HTTP).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import comfy_harness as harness

HOST_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every host-tier test, with the reason, when COMFYUI_PATH is unset."""
    if harness.comfyui_path() is not None:
        return
    skip = pytest.mark.skip(reason=harness.SKIP_REASON)
    for item in items:
        if HOST_DIR in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    """The ComfyUI checkout (COMFYUI_PATH)."""
    root = harness.comfyui_path()
    if root is None:
        pytest.skip(harness.SKIP_REASON)
    return root


@pytest.fixture(scope="session")
def comfy_host(comfy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> harness.ComfyHost:
    """ComfyUI imported on CPU in this process, this pack loaded by `nodes.load_custom_node`."""
    host = harness.start_comfy_host(comfy_root, tmp_path_factory.mktemp("comfy_base"))
    assert host.loaded, "ComfyUI's loader did not load the pack:\n" + "\n".join(host.load_log[-60:])
    return host


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy_host: harness.ComfyHost, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD1.5 checkpoint file, also registered in the in-process ComfyUI's checkpoints folder.

    Its file name (`.name`) is the `ckpt_name` for CheckpointLoaderSimple.
    """
    return registered_checkpoint(
        harness.build_tiny_sd15_checkpoint(tmp_path_factory.mktemp("ckpt") / harness.TINY_CHECKPOINT_NAME))


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(comfy_host: harness.ComfyHost, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SDXL-family checkpoint (Segmind Vega's U-Net layout, full-size CLIP-L and CLIP-G; ~1.8 GB), registered in
    the in-process ComfyUI's checkpoints folder. `sdxl_checkpoint_name` also shows it to the server."""
    return registered_checkpoint(
        harness.build_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl_ckpt") / harness.TINY_SDXL_CHECKPOINT_NAME))


def registered_checkpoint(path: Path) -> Path:
    """`path`, its folder added to the in-process ComfyUI's checkpoints folders."""
    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", str(path.parent), is_default=True)
    return path


@pytest.fixture(scope="session")
def comfy_server(comfy_root: Path, tiny_checkpoint: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.ComfyServer]:
    """A ComfyUI server subprocess whose base directory holds this pack and the tiny checkpoint."""
    base = harness.make_base_directory(tmp_path_factory.mktemp("server_base"), tiny_checkpoint)
    server = harness.ComfyServer(comfy_root, base)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_client(comfy_server: harness.ComfyServer) -> harness.ComfyClient:
    """HTTP/websocket client of `comfy_server`."""
    return harness.ComfyClient(comfy_server)


@pytest.fixture(scope="session")
def serverless_runner(comfy_host: harness.ComfyHost) -> harness.InProcessRunner:
    """Executes prompts with ComfyUI's executor inside this process."""
    return harness.InProcessRunner(comfy_host)


@pytest.fixture(params=["serverless", "http"])
def runner(request: pytest.FixtureRequest) -> harness.PromptRunner:
    """Each test using it runs twice: in-process and against the server subprocess."""
    return request.getfixturevalue("serverless_runner" if request.param == "serverless" else "comfy_client")


@pytest.fixture
def sdxl_checkpoint_name(runner: harness.PromptRunner, tiny_sdxl_checkpoint: Path, request: pytest.FixtureRequest) -> str:
    """The tiny SDXL checkpoint's ckpt_name for `runner` (over HTTP it is linked into the server's checkpoints)."""
    if runner.name == "http":
        harness.make_base_directory(request.getfixturevalue("comfy_server").base, tiny_sdxl_checkpoint)
    return tiny_sdxl_checkpoint.name

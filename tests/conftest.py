import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def ultralytics(monkeypatch, tmp_path):
    """Ultralytics, imported offline with its settings file in a temporary directory (it reads both on import;
    the variables are restored after the test)."""
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_AUTOINSTALL", "false")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    return pytest.importorskip("ultralytics")


@pytest.fixture
def yolo_net(ultralytics):
    """Builds an Ultralytics network (``DetectionModel``) from a YAML name, random weights, nothing downloaded."""
    from ultralytics.nn.tasks import DetectionModel

    return lambda cfg: DetectionModel(cfg, verbose=False)

"""Train an Ultralytics YOLO with DropBlock through Ultralytics' own trainer, then export it to ONNX.

    YOLO(...) -> add_dropblock(yolo, "paper_generic") -> yolo.train(...) -> yolo.export(format="onnx")

``add_dropblock`` registers callbacks: the trainer's model gets its DropBlocks once the trainer has built it,
keep_prob ramps with the trainer's iteration, checkpoints (taken from the EMA copy) stay plain Ultralytics
models, and the trainer's model is stripped when training ends. By default this runs offline on the CPU, on a
tiny synthetic detection set (bright rectangles on noise, one class) written to a temporary directory, with
a YOLOv8n built from its YAML (no weights): it checks the pipeline, not accuracy. Point ``--data`` at a real
data YAML and ``--model`` at pretrained weights to fine-tune for real.

    python examples/finetune_ultralytics.py                               # synthetic data, 2 epochs, 64 px
    python examples/finetune_ultralytics.py --model yolov8n.pt --data coco8.yaml --imgsz 640 --epochs 50

Without ``--data``, Ultralytics' settings, runs and downloads are kept in the temporary directory and nothing is
downloaded (``YOLO_OFFLINE``; an ``Arial.ttf`` placed where Ultralytics looks for its font, see
docs/ultralytics.md), unless those variables are already set.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


def write_synthetic_dataset(root: str | Path, *, n_train: int = 8, n_val: int = 4, imgsz: int = 64,
                            seed: int = 0) -> Path:
    """Write a tiny one-class detection set in YOLO format: images, label files and ``data.yaml``.

    Args:
        root: directory to write into (created if needed).
        n_train: number of training images.
        n_val: number of validation images.
        imgsz: side of the square images.
        seed: seed of the generator (the same seed writes the same files).

    Returns:
        The path of ``data.yaml``.
    """
    import cv2  # an Ultralytics dependency

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            image = rng.integers(0, 80, (imgsz, imgsz, 3), dtype=np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 3))):
                w, h = (int(v) for v in rng.integers(imgsz // 5, imgsz // 2, 2))
                x, y = int(rng.integers(0, imgsz - w)), int(rng.integers(0, imgsz - h))
                image[y:y + h, x:x + w] = rng.integers(160, 256, 3, dtype=np.uint8)
                lines.append(f"0 {(x + w / 2) / imgsz:.6f} {(y + h / 2) / imgsz:.6f} {w / imgsz:.6f} {h / imgsz:.6f}")
            cv2.imwrite(str(root / "images" / split / f"{k}.png"), image)
            (root / "labels" / split / f"{k}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n  0: box\n")
    return data


def offline_config_dir(config_dir: str | Path) -> Path:
    """Make ``config_dir`` an Ultralytics settings directory that needs no download; use it as ``YOLO_CONFIG_DIR``.

    Checking a dataset asks for the font ``Arial.ttf`` in that directory and, when it is missing, asks the network
    for it whether or not anything is plotted: this puts the DejaVu Sans that matplotlib (an Ultralytics
    dependency) ships there under that name, without importing matplotlib (which would write its font cache).

    Args:
        config_dir: the directory (created if needed).

    Returns:
        ``config_dir`` as a Path.
    """
    config_dir = Path(config_dir)
    (config_dir / "Ultralytics").mkdir(parents=True, exist_ok=True)
    font = config_dir / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        matplotlib = importlib.util.find_spec("matplotlib")
        if matplotlib is None or matplotlib.origin is None:
            raise ImportError("offline_config_dir copies matplotlib's DejaVu Sans font; install matplotlib")
        shutil.copyfile(Path(matplotlib.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    return config_dir


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolov8n.yaml", help="a YAML (random weights) or a .pt checkpoint")
    parser.add_argument("--data", default=None, help="a data YAML (default: a synthetic set in a temporary dir)")
    parser.add_argument("--recipe", default="paper_generic")
    parser.add_argument("--target", type=float, default=None, help="final keep_prob (default: the recipe's)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="where runs (and the synthetic set) go (default: a temp dir)")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dropblock_yolo_"))
    data = args.data
    if data is None:
        # before ultralytics is imported: it reads these once (a user's own settings win)
        os.environ.setdefault("YOLO_OFFLINE", "1")
        os.environ.setdefault("YOLO_AUTOINSTALL", "false")
        os.environ.setdefault("YOLO_CONFIG_DIR", str(workdir / "config"))
        offline_config_dir(os.environ["YOLO_CONFIG_DIR"])
        data = str(write_synthetic_dataset(workdir / "data", imgsz=args.imgsz))

    from ultralytics import YOLO

    from dropblock_inject.integrations.ultralytics import add_dropblock

    yolo = YOLO(args.model)
    dropblock = add_dropblock(yolo, args.recipe, target=args.target)
    yolo.train(data=data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, device=args.device, workers=0,
               plots=False, project=str(workdir / "runs"), name="train", exist_ok=True, amp=False, verbose=False)
    scheduler = dropblock.scheduler
    print(f"trained with {len(scheduler.dropblocks)} DropBlocks; keep_prob at the last iteration "
          f"({dropblock.step}): {scheduler.keep_prob_at(dropblock.step):.4f}, "
          f"target {scheduler.keep_prob_at(scheduler.total_steps):.4f}")
    onnx = yolo.export(format="onnx", imgsz=args.imgsz, simplify=False, device=args.device)
    print(f"best checkpoint: {yolo.trainer.best}\nONNX: {onnx}")
    return {"dropblocks": len(scheduler.dropblocks), "step": dropblock.step, "best": str(yolo.trainer.best),
            "onnx": str(onnx)}


if __name__ == "__main__":
    main()

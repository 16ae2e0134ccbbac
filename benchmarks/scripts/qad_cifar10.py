"""Quantization-aware ReviewKD on CIFAR-10: fp32 vs post-training int8 vs QAD int8 on the full test set.

    .venv/bin/python -m benchmarks.scripts.qad_cifar10 --out /tmp/qad_c10 [--epochs 1] [--subset 5000]

The student is the pretrained cifar_resnet20 (../shared/weights/cifar10-resnet), the teacher the
pretrained cifar_resnet56, the data the shared JPEG CIFAR-10 copy with the cifar10_resnet56_resnet20
preset's preprocessing. The script lays the student out as a run (export.pipeline.export_model),
names the teacher and a training subset in the run's config, exports the post-training int8 files
(minmax, 512 training images) and then runs `reviewkd quantize`'s two steps (reviewkd.qad.quantize_run,
export.qad_export.export_qad). Every file is checked on all 10,000 test images. With no ReviewKD
run behind the student, the ABF head starts untrained. Prints one Markdown table.

This script drives the export and training stages, so unlike the rest of benchmarks/ it imports
export and reviewkd; nothing imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from deploy.fileio import sha256_file
from deploy.manifest import read_manifest, write_manifest
from deploy.optional import optional_import
from export.pipeline import export_model, export_run
from reviewkd.config import load_config, load_run_config, save_config

SHARED = Path(os.environ.get("REVIEWKD_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CIFAR = SHARED / "data" / "cifar10"
STUDENT_WEIGHTS = SHARED / "weights" / "cifar10-resnet" / "resnet20-12fca82f.th"
TEACHER_WEIGHTS = SHARED / "weights" / "cifar10-resnet" / "resnet56-4bfd9763.th"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def prepare_run(out: Path, subset: int, check_samples: int) -> None:
    """The student as a run with the teacher recorded, and its post-training int8 files checked."""
    export_model(
        "cifar_resnet20",
        STUDENT_WEIGHTS,
        (3, 32, 32),
        out,
        num_classes=10,
        data_dir=CIFAR,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        formats=["onnx"],
        check_samples=16,
    )
    preset = load_config("cifar10_resnet56_resnet20", [f"data.root={CIFAR}"])
    config = load_run_config(out)
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(
            config.data,
            subset=subset,
            cache=True,
            augment=preset.data.augment,
            crop_padding=preset.data.crop_padding,
        ),
        teacher=dataclasses.replace(preset.teacher, weights=str(TEACHER_WEIGHTS)),
        method=preset.method,
        optim=preset.optim,
        train=dataclasses.replace(config.train, batch_size=preset.train.batch_size, threads=None),
    )
    save_config(config, out / "config.yaml")
    manifest = read_manifest(out)
    manifest["teacher"] = {
        "arch": "cifar_resnet56",
        "weights": str(TEACHER_WEIGHTS),
        "sha256": sha256_file(TEACHER_WEIGHTS),
    }
    manifest["method"] = {"name": "none (pretrained student)", "params": {}}
    write_manifest(out, manifest)
    export_run(out, ["onnx", "int8", "int8-trt"], check_samples=check_samples, log=print)


def main() -> None:
    """Run the comparison and print its table."""
    with optional_import("the CIFAR-10 QAD measurement"):
        from export.qad_export import export_qad
        from reviewkd.qad import quantize_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--subset", type=int, default=5000, help="training images QAD fine-tunes on")
    parser.add_argument("--check-samples", type=int, default=10000)
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args()
    if not (args.out / "manifest.json").is_file():
        prepare_run(args.out, args.subset, args.check_samples)
    result = quantize_run(args.out, args.epochs, lr=args.lr, resume=True, teacher_file=TEACHER_WEIGHTS)
    export_qad(args.out, check_samples=args.check_samples, log=print)
    manifest = read_manifest(args.out)
    checks = manifest["export"]["checks"]
    first = next(iter(checks.values()))
    print(f"\n| file | top-1 % (n={first['n']}) | vs fp32 |\n|---|---|---|")
    print(f"| torch fp32 | {first['reference_top1']:.2f} | |")
    for rel, check in checks.items():
        print(f"| {rel} | {check['top1']:.2f} | {check['top1'] - check['reference_top1']:+.2f} |")
    qad = manifest["qad"]
    print(
        f"\nfake-quant torch, validation: calibrated {qad['calibrated']['top1']:.2f}%, fine-tuned "
        f"{result.top1:.2f}% (epoch {result.epoch}); selected {qad['selected']}"
    )


if __name__ == "__main__":
    main()

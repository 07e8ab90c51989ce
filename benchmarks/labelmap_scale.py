"""At which image size to build label maps: a convnet teacher's top-1 on whole training
images at each size, and how often the label map pooled over the whole image (what
`--targets labelmap` computes, with the box covering the image) agrees with the teacher's
own prediction at that size.

    python benchmarks/labelmap_scale.py --data DIR --teacher-ckpt RUN/checkpoint-last.pt --sizes 64,96,128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from fastdeit.config.schema import DistillConfig
from fastdeit.data.folder import load_dataset
from fastdeit.distill.sources import cell_probs
from fastdeit.models.factory import load_teacher
from fastdeit.pipelines.reference import square_loader
from fastdeit.pipelines.tail import normalize
from fastdeit.report.provenance import measured_on, write_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--teacher-ckpt", type=Path, required=True, help="a fastdeit checkpoint of a convnet")
    p.add_argument("--sizes", default="64,96,128")
    p.add_argument("--every", type=int, default=6, help="use every n-th training image")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    train, _ = load_dataset(a.data)
    rows = np.arange(0, len(train), a.every)
    labels = torch.as_tensor(np.asarray(train.labels)[rows])
    teacher = load_teacher(DistillConfig(mode="hard", teacher_ckpt=str(a.teacher_ckpt)), len(train.classes), 0,
                           torch.device("cpu")).eval()
    report = {"benchmark": "labelmap_scale", **measured_on(torch.device("cpu")),
              "command": " ".join(["labelmap_scale.py", *(argv if argv is not None else sys.argv[1:])]),
              "teacher_ckpt": str(a.teacher_ckpt), "trained_img_size": getattr(teacher, "trained_img_size", None),
              "images": len(rows), "sizes": {}}
    print(f"teacher trained at {report['trained_img_size']} px; {len(rows)} training images")
    for size in map(int, a.sizes.split(",")):
        preds, pooled = [], []
        with torch.no_grad():
            for images, _idx, _ok in square_loader(train, size, 100, 0, rows=rows):
                x = normalize(images)
                preds.append(teacher(x).argmax(1))
                probs = cell_probs(teacher, x)
                pooled.append(probs.mean((2, 3)).argmax(1))  # the whole-image box weighs cells equally
                grid = probs.shape[2]
        pred, pool = torch.cat(preds), torch.cat(pooled)
        r = {"grid": grid, "teacher_top1": float((pred == labels).float().mean()),
             "map_top1": float((pool == labels).float().mean()), "map_agrees_with_teacher": float((pool == pred)
                                                                                                  .float().mean())}
        report["sizes"][size] = r
        print(f"{size:4d} px, {grid}x{grid} map: teacher top-1 {r['teacher_top1']:.1%}, pooled map top-1 "
              f"{r['map_top1']:.1%}, map = teacher on {r['map_agrees_with_teacher']:.1%}")
    write_results(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""NVIDIA DALI pipelines that execute the augmentation plan: the production data path.

One graph builder with a device switch: "gpu" decodes with nvJPEG ("mixed", the hardware
decoder where there is one) and augments on the GPU; "cpu" is the same graph with CPU
operators and device_id=None (libjpeg-turbo), which is what runs without a GPU and in the
tests. The plan reaches the graph through fn.external_source, one step's shard per call:
file bytes, crop boxes (decoded as a region of interest), flips and the RandAugment
parameters. DALI's own RNG is never used, so a plan gives the same batch as the reference
pipeline up to decoder and resampler differences (see tests/test_pipeline_dali.py).
"""

from fastdeit.pipelines.dali.common import available, cuda_major
from fastdeit.pipelines.dali.evaluate import dali_eval_batches
from fastdeit.pipelines.dali.train import DaliTrainLoader, PlanSource, reader_start_method

__all__ = ["DaliTrainLoader", "PlanSource", "available", "cuda_major", "dali_eval_batches", "reader_start_method"]

"""Data pipeline: manifests, audio I/O, bucketed batching, loaders, augmentation, demo corpus."""

from .audio import AudioReadError, audio_info, load_audio
from .augment import KIND_NOISE, KIND_NONE, KIND_SPEECH, NestAugment
from .demo import DemoCorpus, make_demo_corpus
from .loader import AudioBatchDataset, AudioLoader, build_loader
from .manifest import ManifestError, ManifestIndex, load_manifest
from .sampler import BucketBatchSampler, EpochPlan

__all__ = [
    "AudioReadError", "audio_info", "load_audio",
    "NestAugment", "KIND_NONE", "KIND_NOISE", "KIND_SPEECH",
    "DemoCorpus", "make_demo_corpus",
    "AudioBatchDataset", "AudioLoader", "build_loader",
    "ManifestError", "ManifestIndex", "load_manifest",
    "BucketBatchSampler", "EpochPlan",
]

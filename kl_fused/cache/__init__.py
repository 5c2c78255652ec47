"""A teacher's top-k log-probabilities per token, stored once and read by any number of training runs.

    from kl_fused.cache import TeacherCacheWriter, TeacherCache

Needs the `cache` extra (safetensors; tqdm and transformers for `kl-fused-cache build`):
pip install kl_fused[cache]. The format: kl_fused/cache/_manifest.py (manifest), _shard.py (shards),
_packing.py (packed token ids).
"""

try:
    import safetensors  # noqa: F401
except ImportError as error:
    raise ImportError("kl_fused.cache needs the safetensors package: pip install kl_fused[cache]") from error

from kl_fused._teacher_topk import TeacherTopK, check_teacher_vocab
from kl_fused.cache.reader import TeacherCache
from kl_fused.cache.writer import TeacherCacheWriter

__all__ = ["TeacherCache", "TeacherCacheWriter", "TeacherTopK", "check_teacher_vocab"]

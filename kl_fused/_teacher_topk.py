"""TeacherTopK: a teacher's top-k (indices, logprobs) pair that also says which vocabulary its
indices belong to, so that a loss can refuse a student of another vocabulary.

It is a tuple of two tensors (``indices, logprobs = topk`` and ``teacher_topk=topk`` work unchanged)
with a ``vocab_size`` attribute that survives pickling (DataLoader workers). A DataLoader's default
collation or pin_memory rebuilds tuples as lists and drops it; then check ``cache.vocab_size``
yourself.
"""


class TeacherTopK(tuple):
    def __new__(cls, indices, logprobs, vocab_size):
        topk = super().__new__(cls, (indices, logprobs))
        topk.vocab_size = vocab_size
        return topk

    @property
    def indices(self):
        return self[0]

    @property
    def logprobs(self):
        return self[1]

    def __reduce__(self):
        return (TeacherTopK, (self[0], self[1], self.vocab_size))

    def __repr__(self):
        return (f"TeacherTopK(indices={tuple(self[0].shape)} {self[0].dtype}, logprobs={tuple(self[1].shape)} "
                f"{self[1].dtype}, vocab_size={self.vocab_size})")


def check_teacher_vocab(teacher_topk, vocab_size):
    """ValueError when `teacher_topk` carries a vocab_size (a TeacherTopK) other than the student's."""
    teacher_vocab = getattr(teacher_topk, "vocab_size", None)
    if teacher_vocab is not None and teacher_vocab != vocab_size:
        raise ValueError(f"the teacher's top-k come from a vocabulary of {teacher_vocab} tokens (the cache's "
                         f"vocab_size), the student's logits have {vocab_size}: a different tokenizer or model")

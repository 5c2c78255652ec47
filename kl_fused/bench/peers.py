"""What a mode's providers share about peer libraries: why a peer cannot run here (an import that
fails, or a device it does not serve), and the fp32 log-probabilities that Liger's losses take."""

import torch.nn.functional as F


def import_failure(load, package):
    """None if load() succeeds, else why `package` is not importable."""
    try:
        load()
    except Exception as error:  # ImportError, or a broken dependency (triton) underneath it
        return f"{package} is not importable ({type(error).__name__}: {error})"
    return None


def cuda_peer_failure(device, load, package):
    """Why a CUDA-only peer (Liger's Triton kernels) cannot run on `device`, or None."""
    if device.type != "cuda":
        return f"{package} runs on CUDA only"
    return import_failure(load, package)


def fp32_log_probs(student, teacher, temperature):
    """(log q, log p): fp32 log_softmax of student and teacher logits at `temperature`, the inputs of
    Liger's KL and JSD losses."""
    return F.log_softmax(student.float() / temperature, dim=-1), F.log_softmax(teacher.float() / temperature, dim=-1)

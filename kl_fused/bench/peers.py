"""How a mode's providers say why a peer library cannot run here: an import that fails (the peer is
not installed, or something underneath it is broken), or a device it does not serve."""


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

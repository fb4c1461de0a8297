"""gemma3n-executorch: Gemma 3n's text decoder as ExecuTorch programs.

Import side effect, deliberately narrow: silence third-party log lines and warnings that every
run prints and that say nothing to our users (torchao's optional CUDA kernels failing to load on
a CPU machine, torch's pytree deprecation chatter, ExecuTorch's "experimental API" notice).
"""

import logging
import warnings

for _logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_logger).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"This API is experimental", module=r"executorch\..*")
warnings.filterwarnings("ignore", message=r".*_check_is_size.*", category=FutureWarning)

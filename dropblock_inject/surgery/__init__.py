"""FX surgery: find insertion points (``plan``), insert DropBlock (``inject``) and remove it (``strip``).

One ``inject`` call goes down these stages, each a module that imports only the ones before it:

0. :mod:`.wrappers` -- the network inside DataParallel, DDP, ``torch.compile`` or an EMA copy;
1. :mod:`.trace` -- the training-mode fx graph of one module (a *scope*), specialised to how it is called;
2. :mod:`.kinds` -- what a module or node is: conv, norm, act, conv-norm unit, residual add, gate;
3. :mod:`.shapes` -- one example forward recording output shapes (for strides) and call patterns;
4. :mod:`.analyze` -- residual additions, shortcut and branch candidates of one traced scope;
5. :mod:`.select` -- recipe rules -> scopes -> insertion points (``plan``, ``format_plan``);
6. :mod:`.rewrite` -- DropBlock nodes inserted, the injected forward installed (``inject``); ``strip``.

:mod:`.forward` is the runtime of an injected module (the callable installed as its ``forward``), used by
``select`` and ``rewrite``.
"""

from .forward import injected_dropblocks
from .rewrite import inject, strip
from .select import InsertionPoint, format_plan, plan
from .trace import SurgeryError

__all__ = ["InsertionPoint", "SurgeryError", "format_plan", "inject", "injected_dropblocks", "plan", "strip"]

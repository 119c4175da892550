"""Import path kept for pickles made by dropblock_inject 0.1 (``torch.save`` of a whole injected model).

Those pickles name their classes ``dropblock_inject.graph.<name>``; the code now lives in
:mod:`dropblock_inject.surgery`. Nothing else imports from here: use ``dropblock_inject`` itself.
"""

from .surgery.forward import InjectedForward as _InjectedForward
from .surgery.forward import RefuseScripting as _RefuseScripting
from .surgery.select import InsertionPoint
from .surgery.calls import Param as _Param

__all__ = ["InsertionPoint", "_InjectedForward", "_Param", "_RefuseScripting"]  # what old pickles name

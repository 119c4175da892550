"""FX surgery: find insertion points (``plan``), insert DropBlock (``inject``) and remove it (``strip``).

Two phases with one immutable object between them. The *plan phase* probes the model, traces the scopes,
analyses and selects, and returns a frozen :class:`~.blueprint.Plan`; the *install phase* builds and installs
from it, never tracing again. The files are numbered in the order one ``inject`` runs them, and each imports
only the ones before it:

* :mod:`.registry` -- every class, function and quirk of another library the surgery knows, with its reason;
* :mod:`.wrappers` -- the network inside DataParallel, DDP, ``torch.compile`` or an EMA copy;
* :mod:`.points` -- ``InsertionPoint``, the DropBlock classes inject inserts, the already-injected check;
* :mod:`.outputs` -- a scope's structured output flattened for fx and rebuilt with its exact type;
* :mod:`.globals_of` -- the globals a traced forward sees: a copy owned by the trace, never a patch;
* :mod:`.tracer` -- the fx tracer: one module's own forward, children as leaves, nothing left on it;
* :mod:`.kinds` -- what a module or node is: conv, norm, act, conv-norm unit, residual add, gate;
* :mod:`.example`, :mod:`.metaforward` -- the example forward run cheaply (empty batch, meta device);
* :mod:`.dataflow` -- what ran in it, op by op, with each map's stride and provenance;
* :mod:`.calls` -- how each module was called, and how its traced graph takes those arguments;
* :mod:`.shapes` -- that forward's record: output shapes (strides), call patterns, the dataflow;
* :mod:`.residuals`, :mod:`.normprobe`, :mod:`.roles` -- from the dataflow: residual additions, norms by
  behaviour, and what each map is (backbone, neck or head, attention, dead, its stride);
* :mod:`.checkpointing` -- gradient-checkpointing flags a scope reads, decided per call;
* :mod:`.trace` -- the training-mode fx graph of one module (a *scope*), specialised to how it is called;
* :mod:`.analyze` -- residual additions, shortcut and branch candidates of one traced scope;
* :mod:`.explain` -- why a rule selects nothing, whether a model is a CNN, points never allowed;
* :mod:`.groups` -- the stride group a layer counts in under a stride rule;
* :mod:`.select` -- recipe rules -> scopes -> insertion points;
* :mod:`.sites` -- DropBlock calls inserted into a copy of a traced graph;
* :mod:`.sequentials` -- the top module's points handed to the plain Sequentials it calls, when all lie there;
* :mod:`.blueprint` -- the end of the plan phase: the immutable plan (``plan`` returns its points);
* :mod:`.forward` -- the install phase's runtime: the forward installed on a rewritten module, its record;
* :mod:`.roottrace` -- a training-mode fx trace of a rewritten module as the root, refused clearly;
* :mod:`.rewrite` -- the install phase (``inject``), and ``strip``.
"""

from .points import InsertionPoint, injected_dropblocks
from .registry import register
from .rewrite import inject, strip
from .blueprint import plan
from .points import format_plan
from ..errors import SurgeryError

__all__ = ["InsertionPoint", "SurgeryError", "format_plan", "inject", "injected_dropblocks", "plan", "register",
           "strip"]

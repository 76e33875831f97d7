"""AUTOMATIC1111 hypernetworks: loaded safely, applied to a diffusers UNet with strengths, several at once.

File format (A1111's ``modules/hypernetworks/hypernetwork.py``, a ``torch.save``'d dict):

* ``int`` keys are context widths (768, 320, 640, 1280 for SD1.x; 64 and 32 for the zoo models)
  -> ``[key-module state dict, value-module state dict]`` (a list or tuple of two);
* other keys describe the modules: ``layer_structure`` (width multipliers, first and last 1,
  default ``[1, 2, 1]``), ``activation_func`` (default none, i.e. ``'linear'``), ``is_layer_norm``
  (default false), ``activate_output`` (default **true** when loading a file, as in A1111: files
  older than the field activated every layer; false for :meth:`Hypernetwork.new`, as A1111's
  "Create hypernetwork"), ``dropout_structure`` (absent in old files: derived from ``use_dropout``
  and ``last_layer_dropout``, both default false, with A1111's ``parse_dropout_structure``), and
  metadata kept for a faithful re-save (``name``, ``step``, ``weight_initialization``,
  ``sd_checkpoint``, ``sd_checkpoint_name``, ``optional_info``). Anything else (optimizer state)
  is ignored.

Each module is ``torch.nn.Sequential`` named ``linear``: for every pair of consecutive widths
``w_i = int(dim * layer_structure[i])``, a ``Linear(w_i, w_{i+1})``, then the activation (not after
the last Linear unless ``activate_output``; never for ``'linear'``), then ``LayerNorm(w_{i+1})`` if
``is_layer_norm``, then ``Dropout(p)`` if ``dropout_structure[i+1] > 0``. So a file's keys are
``linear.<index in that Sequential>.weight`` / ``.bias`` (activation and dropout layers take
indices too). The oldest files' ``linear1.*`` / ``linear2.*`` keys are renamed to ``linear.0.*`` /
``linear.1.*`` as A1111 does. Loading is strict: every tensor must land on a parameter of the
module built from the file's own fields, with the right shape; otherwise
:class:`HypernetworkError` names the file, the width, the module and the offending keys.

Files are read with ``torch.load(weights_only=True)`` only: a file whose pickle needs anything
beyond tensors and plain containers is refused, never executed.

Math. A module of width ``dim`` maps a context ``x`` (last dimension ``dim``) to
``x + strength * mlp(x)``, with ``strength`` the hypernetwork's :attr:`Hypernetwork.strength`
(A1111's multiplier), in training and in inference alike (A1111 forces 1 while training; here a
training run sets its strength itself, 1.0 by default). ``strength == 0`` returns ``x`` itself (the
MLP is not run), so a zero strength is bit-identical to no hypernetwork. The MLP runs in the
module's dtype: ``x`` is cast to it and the residual cast back to ``x``'s dtype, so a float32
hypernetwork works on a float16 UNet.

In every attention layer, with ``context`` the encoder hidden states (cross-attention) or the
hidden states themselves (self-attention), each hypernetwork of a :class:`HypernetworkStack`, in
order, that has a module pair for ``context.shape[-1]`` maps ``context_k <- k_module(context_k)``
and ``context_v <- v_module(context_v)`` (both chains start at ``context``); then
``key = to_k(context_k)``, ``value = to_v(context_v)``; the query is unchanged. This is A1111's
``apply_hypernetworks`` (several hypernetworks as in the sd-webui-multiple-hypernetworks extension).

Installation uses diffusers' public ``set_attn_processor``: :func:`install_hypernetworks` puts one
:class:`HypernetworkAttnProcessor` (the math of ``AttnProcessor2_0`` with the key/value context
above) on every attention layer; :func:`remove_hypernetworks` puts ``AttnProcessor2_0`` back. The
processor is a plain object, not a module, so the hypernetwork parameters stay out of the UNet's
``state_dict`` and ``parameters()``: move (``stack.to(...)``) and switch modes (``stack.train()``)
on the stack itself. Strengths are read at every call: change them between trials with
:meth:`HypernetworkStack.set_strengths`, without reinstalling.

Modes: hypernetworks are created and loaded in eval mode with ``requires_grad`` off, as in A1111;
``train()`` turns gradients on (and dropout), ``eval()`` off again.

The package, one concern per module: :mod:`.structure` (the fields and errors), :mod:`.modules`
(the MLPs, creation, saving), :mod:`.file_format` (reading files), :mod:`.stack` (several at
once), :mod:`.attention` (the diffusers attention processor).
"""

from optimizer.adapters.hypernetwork.attention import HypernetworkAttnProcessor, install_hypernetworks, remove_hypernetworks
from optimizer.adapters.hypernetwork.file_format import hypernetwork_from_state, load_hypernetwork
from optimizer.adapters.hypernetwork.modules import Hypernetwork, HypernetworkModule, save_hypernetwork
from optimizer.adapters.hypernetwork.stack import HypernetworkStack
from optimizer.adapters.hypernetwork.structure import (
    ACTIVATIONS,
    WEIGHT_INITS,
    HypernetworkError,
    HypernetworkFileNotFoundError,
    HypernetworkStructure,
    parse_dropout_structure,
)

__all__ = [
    "ACTIVATIONS",
    "WEIGHT_INITS",
    "Hypernetwork",
    "HypernetworkAttnProcessor",
    "HypernetworkError",
    "HypernetworkFileNotFoundError",
    "HypernetworkModule",
    "HypernetworkStack",
    "HypernetworkStructure",
    "hypernetwork_from_state",
    "install_hypernetworks",
    "load_hypernetwork",
    "parse_dropout_structure",
    "remove_hypernetworks",
    "save_hypernetwork",
]

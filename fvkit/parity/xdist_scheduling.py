"""xdist scheduling that keeps each model's gate tests on one worker.

    pytest parity_tests -n 2          # the plugin installs ModelScopeScheduling for plain -n

A model is loaded once per worker and ``--fail-fast`` needs a model's earlier
gates to have run where its later gates run, so all tests of one model form one
unit of work. The model is read from the test's parameter id, whose format
the gate registry owns (:func:`fvkit.parity.registry.param_id`). Tests without
a parameter id are units of their own, as under ``--dist load``.
"""

from __future__ import annotations

from fvkit.parity.registry import model_of_param_id, param_id_of_nodeid


def model_scope(nodeid: str) -> str:
    """The unit of work a test id belongs to: its model, else the test itself."""
    param = param_id_of_nodeid(nodeid)
    return nodeid if param is None else "model:" + model_of_param_id(param)


def make_scheduler(config, log):
    """A LoadScopeScheduling whose scopes are models (see :func:`model_scope`)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModelScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return model_scope(nodeid)

    return ModelScopeScheduling(config, log)

"""The engine: how the networks of :mod:`virtualpatient.network` are evaluated and trained, fast.

It computes what the plain dense math computes (up to float rounding; the regression tests hold
it to the stored numbers bit for bit) and only changes how. Where each piece lives:

========================  ==========================================================================
``settings.py``           :class:`~virtualpatient.engine.settings.EngineConfig`, the process-wide
                          ``settings.ENGINE`` and :func:`~virtualpatient.engine.settings.engine_options`
``batched.py``            the batched network: :func:`~virtualpatient.engine.batched.forward`,
                          :func:`~virtualpatient.engine.batched.accuracy`,
                          :func:`~virtualpatient.engine.batched.train`, mini-batches, the dense
                          reference path and the working copy (``_Net``, ``_Layer``) with its
                          hand-written backward pass
``hidden.py``             a hidden layer's order of operations, defined once
                          (:class:`~virtualpatient.engine.hidden.HiddenLayer`): every path follows it
``adam.py``               the optimiser, :class:`~virtualpatient.engine.adam.BatchedAdam`
``reduction.py``          the live units of a masked network (noise-free training skips the rest)
``ops.py``                one layer's products (compressed: ``Pattern``, SpMM, SDDMM; dense: oneDNN)
                          and a hidden layer's fused elementwise steps, without autograd
``native.py``             the native kernels: build, cache, load and call them;
                          ``VIRTUALPATIENT_SPARSE`` and ``VIRTUALPATIENT_MARCH``
``kernels/*.c``           the C source of the native kernels (``products.c``, ``elementwise.c``)
========================  ==========================================================================

This package imports nothing above :mod:`virtualpatient.network` (``tests/test_import_graph.py``),
and its ``__init__`` imports none of its modules: import the one you need
(``from virtualpatient.engine import batched``).
"""

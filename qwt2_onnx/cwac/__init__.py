"""CWAC, QwT-v2's channel-wise affine compensation: fitted in closed form on calibration data, gated, and
folded into the parameters the int8 graph already has.  Modules in the order a compile uses them:

    records      what the fit produces and the gate measured (typed records; a leaf)
    closed_form  the per-channel sums and the closed-form map, with its maths
    segments     the graph segment each stage runs, and the boundary-tensor cache
    points       each layer's stage, float compensation point, score heads
    graphs       what one candidate's staged fit runs (unfused model, float model, segment plans)
    fit          the staged fit (global / local targets) over stage workers, the per-layer gate
    gate         the output gate: measure (held-out output error) and decision
    fold         the unfused and fused graphs of a fitted compensation
    params       --cwac-params: a compensation fitted elsewhere
    shards       the fit's workers over shards of the samples (in process; ray_shards: on Ray)
    reference    the slow definition the staged fit must equal (tests, benchmarks)

This package imports nothing at import time: ``from qwt2_onnx.cwac.fit import fit_compensations``.
"""

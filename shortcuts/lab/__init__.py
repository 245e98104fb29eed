"""Research scripts and studies around the engine (traces, exit and skip studies, sweeps, reports,
micro-benches). They may import anything; nothing in the product (``shortcuts`` outside ``lab``,
``service``) imports them. The calibration library they build on is ``shortcuts.calibration``."""

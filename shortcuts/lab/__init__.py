"""Research tooling around the engine, never imported by the server: teacher-forced agreement tables
and calibration (``onejump calibrate``), threshold sweeps and their reports, and the benches."""

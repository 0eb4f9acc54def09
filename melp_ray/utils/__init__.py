"""Infrastructure every layer may use: storage (local paths and object stores), distributed
(sums and means over ranks), console (what a run prints) and ray_connect (connecting to Ray
the same way from every entry point). It imports nothing else of melp_ray."""

"""Infrastructure every layer may use: storage (local paths and object stores), distributed
(sums and means over ranks), console (what a run prints), ray_connect (connecting to Ray the
same way from every entry point) and cluster_checks (offline checks of the cluster configs).
It imports nothing else of melp_ray."""

"""`stoke simulate`: stoke's own placement, keep-alive, node autoscaling and preemption-drain
decisions replayed over real request and spot traces, on a simulated cluster in virtual time."""

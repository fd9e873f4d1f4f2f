//! Server plumbing shared by the dagmesh services: serving, health, reflection, shutdown, telemetry

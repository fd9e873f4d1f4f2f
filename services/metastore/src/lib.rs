//! The dagmesh metadata store: the system of record (sqlx: SQLite or PostgreSQL)

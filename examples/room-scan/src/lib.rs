//! Example: a room-scan reconstruction workflow and its workers

//! Integration tests on a real PostgreSQL (a throwaway cluster started by the harness in `common`).

mod capture;
mod common;
mod concurrency;
mod dispatch;
mod explain;
mod migrations;
mod sql_interface;

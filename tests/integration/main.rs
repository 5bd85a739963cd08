//! Integration tests on a real PostgreSQL (a throwaway cluster started by the harness in `common`).

mod admin;
mod audit_library;
mod capture;
mod common;
mod concurrency;
mod delivery;
mod dispatch;
mod explain;
mod logs;
mod migrations;
mod operations;
mod receiver;
mod sql_interface;

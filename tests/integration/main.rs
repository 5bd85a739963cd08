//! Integration tests on a real PostgreSQL (a throwaway cluster started by the harness in `common`).

mod capture;
mod common;
mod concurrency;
mod delivery;
mod demo;
mod dispatch;
mod explain;
mod migrations;
mod receiver;
mod sql_interface;

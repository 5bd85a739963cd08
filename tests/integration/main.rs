//! Integration tests on a real PostgreSQL (a throwaway cluster started by the harness in `common`).

mod admin;
mod audit_library;
mod bots;
mod capture;
mod common;
mod concurrency;
mod delivery;
mod demo;
mod dispatch;
mod explain;
mod faults;
mod hostile;
mod logs;
mod migrations;
mod nesting;
mod operations;
mod operator_errors;
mod pipeline;
mod precommit;
mod readme;
mod receiver;
mod roles;
mod sql_interface;
mod strict;
mod timing;
mod wakeup;

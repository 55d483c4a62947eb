//! One integration-test binary: end-to-end runs of the `caudal` binary against the
//! shared workload's golden answer, crash/restart, bad input and config errors.

mod support;

mod bad_input;
mod capture_mysql;
mod capture_mysql_gtid;
mod config_errors;
mod crash;
mod end_to_end_mysql;
mod gold;
mod kafka;
mod keys;
mod mysql_sink;
mod postgres_sink;
mod serve;
mod simulate;

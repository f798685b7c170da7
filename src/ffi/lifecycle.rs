//! FFI for resty.worker.manager and resty.workerbus: the lifecycle table.

-- One database per service: each service owns its tables (DESIGN.md).
CREATE DATABASE ferry_intake OWNER ferry;
CREATE DATABASE ferry_resolver OWNER ferry;
CREATE DATABASE ferry_snapshotter OWNER ferry;
CREATE DATABASE ferry_archiver OWNER ferry;
CREATE DATABASE ferry_transfer OWNER ferry;

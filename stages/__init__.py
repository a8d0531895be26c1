"""WHAT is generated: pure logic over an engine; no I/O, no Prefect."""

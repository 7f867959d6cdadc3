"""Operations: the service (run, reload, stop, systemd), metrics and health, explain and the CLI;
what an operator touches. Starts the stages and hands each its Config."""

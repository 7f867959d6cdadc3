"""Receive: the Storage SCP. Association policy (who may connect), the socket-thread C-STORE path
that streams each dataset into the spool and fsyncs it before Success; hands on SpoolEntry."""

"""Transcode: decode, re-encode to the rule's target, verify, keep the lossy bookkeeping (a pure
function, dataset in, dataset out), and write the output file; hands on the files to deliver."""

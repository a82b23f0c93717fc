"""genq: the command line and the tools that span packages (``genq up``)."""

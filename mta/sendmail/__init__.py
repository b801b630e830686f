"""The `sendmail` entry point for applications that do not speak SMTP (cron, PHP mail(), scripts):
args.py parses the flags real callers send, message.py prepares the input (pure), main.py stores
it through the same acceptance path as the SMTP listener (mta.submission.accept)."""

"""paramiko (a Python SSH library agents use) through wicket-ssh.

Usage: paramiko_client.py HOST PORT TOKEN; prints one JSON object of what it saw.
"""
import io
import json
import sys
import time

import paramiko

host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = {}
c = paramiko.SSHClient()
c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
c.connect(host, port=port, username="agent", password=token, look_for_keys=False, allow_agent=False)

stdin, stdout, stderr = c.exec_command("echo hello; exit 4", environment={"WICKET_REASONING": "paramiko check"})
seen["exec_out"] = stdout.read().decode()
seen["exec_status"] = stdout.channel.recv_exit_status()

stdin, stdout, stderr = c.exec_command("rm -rf /boot/wicket-test-nonexistent")
seen["denied_status"] = stdout.channel.recv_exit_status()
seen["denied_err"] = stderr.read().decode()

sftp = c.open_sftp()
path = sys.argv[4]
sftp.putfo(io.BytesIO(b"p" * 300_000), path)
seen["sftp_size"] = sftp.stat(path).st_size
buf = io.BytesIO()
sftp.getfo(path, buf)
seen["sftp_back"] = len(buf.getvalue())
sftp.remove(path)
sftp.close()

ch = c.invoke_shell()
ch.send("echo shell=$((40+2))\n")
out, deadline = "", time.time() + 10
while "shell=42" not in out and time.time() < deadline:
    if ch.recv_ready():
        out += ch.recv(65536).decode(errors="replace")
    else:
        time.sleep(0.05)
seen["shell"] = "shell=42" in out
# A window change reaches the host's terminal.
ch.resize_pty(width=101, height=41)
time.sleep(0.3)
ch.send("stty size\n")
out, deadline = "", time.time() + 10
while "41 101" not in out and time.time() < deadline:
    if ch.recv_ready():
        out += ch.recv(65536).decode(errors="replace")
    else:
        time.sleep(0.05)
seen["resized"] = "41 101" in out
ch.close()
c.close()
print(json.dumps(seen))

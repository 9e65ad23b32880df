#!/bin/bash
# Live upgrade from the a407469 binary (record version 3) to the current one (version 4):
# 500 idle plaintext sessions must move and still echo afterwards.
set -u
cd /tmp/exp/xv
OLD=${OLD:-/tmp/ci-clone/target/release/ringlb}; NEW=${NEW:-/work/main/target/release/ringlb}
LOAD=/work/main/target/release/ringlb-load
cp -f $OLD ./ringlb
cat > xv.toml <<'T'
[server]
listen = ["127.0.0.1:27121"]
shards = 2
[[route]]
path = "/"
upstream = "echo"
[upstream.echo]
servers = [ { addr = "127.0.0.1:27112" } ]
T
$LOAD echo --listen 127.0.0.1:27112 >/dev/null 2>&1 & E=$!
RUST_LOG=info ./ringlb run --config xv.toml > xv-ringlb.log 2>&1 & R=$!
sleep 0.7
$LOAD idle --url ws://127.0.0.1:27121/ --connections 500 --hold 8s --json xv.json > xv-load.log 2>&1 & L=$!
sleep 4
cp -f $NEW ./ringlb.new && mv -f ./ringlb.new ./ringlb
$NEW upgrade --pid $R --timeout 30s; echo "upgrade exit $?"
wait $L; echo "idle exit $?"
python3 -c "import json; d=json.load(open('xv.json')); print('connections', d.get('connections'), 'errors', {k:v for k,v in d.get('errors',{}).items() if v})"
grep -h 'took over\|handed\|version' xv-ringlb.log | head -5
kill $E; pkill -P $$ 2>/dev/null; for p in $(pgrep -f 'xv.toml'); do kill $p; done; wait 2>/dev/null

import gzip, json, sys
t = json.load(gzip.open(sys.argv[1], 'rt'))
ev = t['traceEvents'] if isinstance(t, dict) else t
X = [e for e in ev if e.get('ph') == 'X']
steps = [e for e in X if e['name'].endswith('loop.py:153 step') or e['name'].startswith('$loop.py') and e['name'].endswith(' step')]
s = steps[len(steps) // 2]
inner = [e for e in X if e['pid'] == s['pid'] and e['tid'] == s['tid'] and e['ts'] >= s['ts']
         and e['ts'] + e['dur'] <= s['ts'] + s['dur'] and e['dur'] > 150]
for e in sorted(inner, key=lambda e: e['ts']):
  print(round((e['ts'] - s['ts']) / 1e3, 2), round(e['dur'] / 1e3, 2), e['name'][:100])

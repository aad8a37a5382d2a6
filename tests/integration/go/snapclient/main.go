// Command snapclient drives a containerd Snapshots gRPC service the way Go
// users of containerd 1.6 and grpc-go 1.33 do: grpc.DialContext on the
// socket path with a unix context dialer (so the HTTP/2 :authority is the
// path), wrapped in containerd's own proxy snapshotter, and every check
// through the snapshots.Snapshotter interface, errors classified with
// containerd's errdefs.
//
//	snapclient -address /run/x.sock [-snapshotter name] [-bad-filter-error unknown]
//
// -bad-filter-error is the error kind a List with a malformed filter must
// get: "invalid-argument" (the default), or "unknown" for a service that
// passes Walk's error through unmapped, as containerd 1.6's own services do
// (contrib/snapshotservice and services/snapshots return it without
// errdefs.ToGRPC, so it reaches the client as codes.Unknown).
//
// It prints one JSON object per line: {"check", "rpcs", "ok", "detail"} for
// each check, then {"state": [...]} (every snapshot it left, as Walk shows
// them), then {"summary": {"passed", "failed"}}; it exits 1 if a check
// failed, 2 if it could not run at all.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"google.golang.org/grpc"
)

const callTimeout = 60 * time.Second

type checker struct {
	out            *json.Encoder
	passed, failed int
}

type record struct {
	Check  string   `json:"check"`
	RPCs   []string `json:"rpcs"`
	OK     bool     `json:"ok"`
	Detail string   `json:"detail,omitempty"`
}

// check records one named check over the RPCs it exercises: fn returns nil
// when the behaviour was the expected one.
func (c *checker) check(name string, rpcs []string, fn func() error) {
	err := fn()
	r := record{Check: name, RPCs: rpcs, OK: err == nil}
	if err != nil {
		r.Detail = err.Error()
		c.failed++
	} else {
		c.passed++
	}
	if encErr := c.out.Encode(r); encErr != nil {
		fatal(encErr)
	}
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "snapclient: %v\n", err)
	os.Exit(2)
}

func rpcs(names ...string) []string { return names }

func call() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), callTimeout)
}

// wantErr checks that err is of the kind `is` recognises (an errdefs.Is*).
func wantErr(err error, kind string, is func(error) bool) error {
	if err == nil {
		return fmt.Errorf("no error, want %s", kind)
	}
	if !is(err) {
		return fmt.Errorf("error %q is not %s", err, kind)
	}
	return nil
}

func options(m mount.Mount) map[string]string {
	out := map[string]string{}
	for _, o := range m.Options {
		k, v, _ := strings.Cut(o, "=")
		out[k] = v
	}
	return out
}

func isDir(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", path)
	}
	return nil
}

// bindSource checks an active or view snapshot without an overlay: one bind
// mount of an existing directory, rbind, and ro or rw as asked.
func bindSource(ms []mount.Mount, mode string) (string, error) {
	if len(ms) != 1 {
		return "", fmt.Errorf("%d mounts, want 1: %+v", len(ms), ms)
	}
	m := ms[0]
	opts := options(m)
	if m.Type != "bind" {
		return "", fmt.Errorf("mount type %q, want bind: %+v", m.Type, m)
	}
	if _, ok := opts["rbind"]; !ok {
		return "", fmt.Errorf("bind mount without rbind: %+v", m)
	}
	if _, ok := opts[mode]; !ok {
		return "", fmt.Errorf("bind mount not %s: %+v", mode, m)
	}
	return m.Source, isDir(m.Source)
}

// overlayDirs checks one overlay mount: its lowerdirs (top first), and its
// upperdir ("" for a view: no upperdir and no workdir); every one exists.
func overlayDirs(ms []mount.Mount) (lower []string, upper string, err error) {
	if len(ms) != 1 {
		return nil, "", fmt.Errorf("%d mounts, want 1: %+v", len(ms), ms)
	}
	m := ms[0]
	if m.Type != "overlay" {
		return nil, "", fmt.Errorf("mount type %q, want overlay: %+v", m.Type, m)
	}
	opts := options(m)
	if opts["lowerdir"] == "" {
		return nil, "", fmt.Errorf("overlay without lowerdir: %+v", m)
	}
	lower = strings.Split(opts["lowerdir"], ":")
	upper = opts["upperdir"]
	if (upper == "") != (opts["workdir"] == "") {
		return nil, "", fmt.Errorf("upperdir and workdir must come together: %+v", m)
	}
	for _, d := range append(append([]string{}, lower...), upper, opts["workdir"]) {
		if d == "" {
			continue
		}
		if err := isDir(d); err != nil {
			return nil, "", err
		}
	}
	return lower, upper, nil
}

func sameLabels(got, want map[string]string) error {
	if len(got) == 0 && len(want) == 0 {
		return nil
	}
	if !reflect.DeepEqual(got, want) {
		return fmt.Errorf("labels %v, want %v", got, want)
	}
	return nil
}

func infoIs(info snapshots.Info, name string, kind snapshots.Kind, parent string,
	labels map[string]string) error {
	if info.Name != name {
		return fmt.Errorf("name %q, want %q", info.Name, name)
	}
	if info.Kind != kind {
		return fmt.Errorf("%s: kind %v, want %v", name, info.Kind, kind)
	}
	if info.Parent != parent {
		return fmt.Errorf("%s: parent %q, want %q", name, info.Parent, parent)
	}
	if info.Created.IsZero() || info.Updated.Before(info.Created) {
		return fmt.Errorf("%s: created %v, updated %v", name, info.Created, info.Updated)
	}
	return sameLabels(info.Labels, labels)
}

func walkNames(sn snapshots.Snapshotter, filters ...string) ([]string, error) {
	ctx, cancel := call()
	defer cancel()
	var names []string
	err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		names = append(names, info.Name)
		return nil
	}, filters...)
	sort.Strings(names)
	return names, err
}

func sameNames(got []string, want ...string) error {
	sort.Strings(want)
	if !reflect.DeepEqual(got, want) && !(len(got) == 0 && len(want) == 0) {
		return fmt.Errorf("walked %v, want %v", got, want)
	}
	return nil
}

// errorKind names an error class and recognises it.
type errorKind struct {
	name string
	is   func(error) bool
}

type stateEntry struct {
	Name   string            `json:"name"`
	Kind   string            `json:"kind"`
	Parent string            `json:"parent"`
	Labels map[string]string `json:"labels"`
}

func main() {
	address := flag.String("address", "", "the unix socket of the Snapshots service")
	name := flag.String("snapshotter", "ovl", "the snapshotter name sent in every request")
	badFilter := flag.String("bad-filter-error", "invalid-argument",
		"the error kind of a List with a malformed filter: invalid-argument or unknown")
	flag.Parse()
	if *address == "" {
		fatal(errors.New("-address is required"))
	}
	var filterErr errorKind
	switch *badFilter {
	case "invalid-argument":
		filterErr = errorKind{"invalid argument", errdefs.IsInvalidArgument}
	case "unknown":
		filterErr = errorKind{"unknown", func(err error) bool {
			return errors.Is(err, errdefs.ErrUnknown)
		}}
	default:
		fatal(fmt.Errorf("-bad-filter-error %q: want invalid-argument or unknown", *badFilter))
	}

	dialCtx, cancelDial := context.WithTimeout(context.Background(), 30*time.Second)
	// The usual grpc-go 1.33 dial of a unix socket: the target is the bare
	// path, which grpc-go also sends as the :authority.
	conn, err := grpc.DialContext(dialCtx, *address, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", addr)
		}))
	cancelDial()
	if err != nil {
		fatal(fmt.Errorf("dial %s: %w", *address, err))
	}
	defer conn.Close()
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), *name)
	c := &checker{out: json.NewEncoder(os.Stdout)}
	run(c, sn, filterErr)

	var state []stateEntry
	ctx, cancel := call()
	err = sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		kind := strings.ToLower(info.Kind.String())
		state = append(state, stateEntry{info.Name, kind, info.Parent, info.Labels})
		return nil
	})
	cancel()
	if err != nil {
		fatal(fmt.Errorf("final walk: %w", err))
	}
	sort.Slice(state, func(i, j int) bool { return state[i].Name < state[j].Name })
	if err := c.out.Encode(map[string]any{"state": state}); err != nil {
		fatal(err)
	}
	summary := map[string]int{"passed": c.passed, "failed": c.failed}
	if err := c.out.Encode(map[string]any{"summary": summary}); err != nil {
		fatal(err)
	}
	if c.failed > 0 {
		os.Exit(1)
	}
}

// run is the whole scenario; it leaves base <- mid <- final (committed,
// committed, active) behind for the caller to compare with its own view.
func run(c *checker, sn snapshots.Snapshotter, filterErr errorKind) {
	var baseDir, midDir string
	var baseInfo snapshots.Info
	baseLabels := map[string]string{"l1": "v1", "containerd.io/gc.root": "snapclient"}
	payload := make([]byte, 8192)

	c.check("prepare without parent: one rw bind mount of a directory", rpcs("Prepare"),
		func() error {
			ctx, cancel := call()
			defer cancel()
			ms, err := sn.Prepare(ctx, "base-active", "", snapshots.WithLabels(baseLabels))
			if err != nil {
				return err
			}
			baseDir, err = bindSource(ms, "rw")
			if err != nil {
				return err
			}
			// the layer is writable where the mount says it is
			if err := os.MkdirAll(filepath.Join(baseDir, "etc"), 0o755); err != nil {
				return err
			}
			return os.WriteFile(filepath.Join(baseDir, "etc", "payload"), payload, 0o644)
		})
	c.check("mounts of the active equals what prepare returned", rpcs("Mounts"), func() error {
		ctx, cancel := call()
		defer cancel()
		ms, err := sn.Mounts(ctx, "base-active")
		if err != nil {
			return err
		}
		dir, err := bindSource(ms, "rw")
		if err == nil && dir != baseDir {
			err = fmt.Errorf("mounts source %q, prepare gave %q", dir, baseDir)
		}
		return err
	})
	c.check("stat of the active: kind, parent, labels", rpcs("Stat"), func() error {
		ctx, cancel := call()
		defer cancel()
		info, err := sn.Stat(ctx, "base-active")
		if err != nil {
			return err
		}
		return infoIs(info, "base-active", snapshots.KindActive, "", baseLabels)
	})
	c.check("usage of the active counts what was written", rpcs("Usage"), func() error {
		ctx, cancel := call()
		defer cancel()
		u, err := sn.Usage(ctx, "base-active")
		if err != nil {
			return err
		}
		// the layer's root, etc/ and etc/payload
		if u.Size < int64(len(payload)) || u.Inodes < 3 {
			return fmt.Errorf("usage %+v, want >= %d bytes and >= 3 inodes", u, len(payload))
		}
		return nil
	})
	c.check("commit: the active becomes committed, labels from the commit only",
		rpcs("Commit", "Stat"), func() error {
			ctx, cancel := call()
			defer cancel()
			if err := sn.Commit(ctx, "base", "base-active",
				snapshots.WithLabels(map[string]string{"c": "1"})); err != nil {
				return err
			}
			if _, err := sn.Stat(ctx, "base-active"); !errdefs.IsNotFound(err) {
				return fmt.Errorf("the active is still there after commit: %v", err)
			}
			info, err := sn.Stat(ctx, "base")
			if err != nil {
				return err
			}
			baseInfo = info
			return infoIs(info, "base", snapshots.KindCommitted, "", map[string]string{"c": "1"})
		})
	c.check("usage of the committed snapshot", rpcs("Usage"), func() error {
		ctx, cancel := call()
		defer cancel()
		u, err := sn.Usage(ctx, "base")
		if err != nil {
			return err
		}
		if u.Size < int64(len(payload)) || u.Inodes < 3 {
			return fmt.Errorf("usage %+v, want >= %d bytes and >= 3 inodes", u, len(payload))
		}
		return nil
	})
	c.check("prepare over a parent: an overlay on the parent's layer", rpcs("Prepare", "Stat"),
		func() error {
			ctx, cancel := call()
			defer cancel()
			ms, err := sn.Prepare(ctx, "mid-active", "base")
			if err != nil {
				return err
			}
			lower, upper, err := overlayDirs(ms)
			if err != nil {
				return err
			}
			if !reflect.DeepEqual(lower, []string{baseDir}) || upper == "" {
				return fmt.Errorf("lowerdirs %v upperdir %q, want [%s] and an upperdir",
					lower, upper, baseDir)
			}
			if _, err := os.Stat(filepath.Join(lower[0], "etc", "payload")); err != nil {
				return fmt.Errorf("the parent's layer lost its file: %w", err)
			}
			midDir = upper
			info, err := sn.Stat(ctx, "mid-active")
			if err != nil {
				return err
			}
			return infoIs(info, "mid-active", snapshots.KindActive, "base", nil)
		})
	c.check("two layers: lowerdirs top first", rpcs("Commit", "Prepare"), func() error {
		ctx, cancel := call()
		defer cancel()
		if err := sn.Commit(ctx, "mid", "mid-active"); err != nil {
			return err
		}
		ms, err := sn.Prepare(ctx, "top-active", "mid",
			snapshots.WithLabels(map[string]string{"role": "top"}))
		if err != nil {
			return err
		}
		lower, upper, err := overlayDirs(ms)
		if err != nil {
			return err
		}
		if !reflect.DeepEqual(lower, []string{midDir, baseDir}) || upper == "" {
			return fmt.Errorf("lowerdirs %v upperdir %q, want [%s %s] and an upperdir",
				lower, upper, midDir, baseDir)
		}
		return nil
	})
	c.check("view of one layer: a read-only bind of it", rpcs("View", "Stat"), func() error {
		ctx, cancel := call()
		defer cancel()
		ms, err := sn.View(ctx, "view-1", "base",
			snapshots.WithLabels(map[string]string{"role": "view"}))
		if err != nil {
			return err
		}
		dir, err := bindSource(ms, "ro")
		if err != nil {
			return err
		}
		if dir != baseDir {
			return fmt.Errorf("view binds %q, want the parent's layer %q", dir, baseDir)
		}
		info, err := sn.Stat(ctx, "view-1")
		if err != nil {
			return err
		}
		return infoIs(info, "view-1", snapshots.KindView, "base",
			map[string]string{"role": "view"})
	})
	c.check("view of two layers: an overlay without upperdir", rpcs("View", "Mounts"),
		func() error {
			ctx, cancel := call()
			defer cancel()
			if _, err := sn.View(ctx, "view-2", "mid"); err != nil {
				return err
			}
			ms, err := sn.Mounts(ctx, "view-2")
			if err != nil {
				return err
			}
			lower, upper, err := overlayDirs(ms)
			if err != nil {
				return err
			}
			if !reflect.DeepEqual(lower, []string{midDir, baseDir}) || upper != "" {
				return fmt.Errorf("lowerdirs %v upperdir %q, want [%s %s] and none",
					lower, upper, midDir, baseDir)
			}
			return nil
		})

	c.check("update one label by field path", rpcs("Update"), func() error {
		ctx, cancel := call()
		defer cancel()
		info, err := sn.Update(ctx, snapshots.Info{Name: "base",
			Labels: map[string]string{"c": "2", "ignored": "x"}}, "labels.c")
		if err != nil {
			return err
		}
		if err := infoIs(info, "base", snapshots.KindCommitted, "",
			map[string]string{"c": "2"}); err != nil {
			return err
		}
		if !info.Created.Equal(baseInfo.Created) || info.Updated.Before(baseInfo.Updated) {
			return fmt.Errorf("created %v -> %v, updated %v -> %v", baseInfo.Created,
				info.Created, baseInfo.Updated, info.Updated)
		}
		return nil
	})
	c.check("update adds a label, deletes one by an empty value, replaces all",
		rpcs("Update", "Stat"), func() error {
			ctx, cancel := call()
			defer cancel()
			if _, err := sn.Update(ctx, snapshots.Info{Name: "base",
				Labels: map[string]string{"new": "n"}}, "labels.new", "labels.c"); err != nil {
				return err
			}
			info, err := sn.Stat(ctx, "base")
			if err != nil {
				return err
			}
			if err := sameLabels(info.Labels, map[string]string{"new": "n"}); err != nil {
				return err
			}
			// no field paths: every label replaced, kind and parent untouched
			info, err = sn.Update(ctx, snapshots.Info{Name: "mid", Kind: snapshots.KindActive,
				Parent: "elsewhere", Labels: map[string]string{"layer": "mid"}})
			if err != nil {
				return err
			}
			return infoIs(info, "mid", snapshots.KindCommitted, "base",
				map[string]string{"layer": "mid"})
		})

	c.check("walk without filters sees every snapshot", rpcs("List"), func() error {
		names, err := walkNames(sn)
		if err != nil {
			return err
		}
		return sameNames(names, "base", "mid", "top-active", "view-1", "view-2")
	})
	c.check("walk with filters (kind, parent, labels, any of several)", rpcs("List"),
		func() error {
			cases := []struct {
				filters []string
				want    []string
			}{
				{[]string{"kind==view"}, []string{"view-1", "view-2"}},
				{[]string{"parent==base"}, []string{"mid", "view-1"}},
				{[]string{"labels.new==n"}, []string{"base"}},
				{[]string{`labels."role"==top`}, []string{"top-active"}},
				{[]string{"kind==committed,parent!=\"\""}, []string{"mid"}},
				{[]string{"name==base", "name==view-2"}, []string{"base", "view-2"}},
				{[]string{"name==nothing"}, nil},
			}
			for _, tc := range cases {
				names, err := walkNames(sn, tc.filters...)
				if err != nil {
					return fmt.Errorf("%q: %w", tc.filters, err)
				}
				if err := sameNames(names, tc.want...); err != nil {
					return fmt.Errorf("%q: %w", tc.filters, err)
				}
			}
			return nil
		})

	c.check("the namespace header changes nothing for a plain snapshotter", rpcs("Stat"),
		func() error {
			ctx, cancel := call()
			defer cancel()
			info, err := sn.Stat(namespaces.WithNamespace(ctx, "snapclient"), "mid")
			if err != nil {
				return err
			}
			return infoIs(info, "mid", snapshots.KindCommitted, "base",
				map[string]string{"layer": "mid"})
		})

	errorCases := []struct {
		name string
		rpcs []string
		kind string
		is   func(error) bool
		do   func(ctx context.Context) error
	}{
		{"stat of a missing key", rpcs("Stat"), "not found", errdefs.IsNotFound,
			func(ctx context.Context) error { _, err := sn.Stat(ctx, "missing"); return err }},
		{"mounts of a missing key", rpcs("Mounts"), "not found", errdefs.IsNotFound,
			func(ctx context.Context) error { _, err := sn.Mounts(ctx, "missing"); return err }},
		{"usage of a missing key", rpcs("Usage"), "not found", errdefs.IsNotFound,
			func(ctx context.Context) error { _, err := sn.Usage(ctx, "missing"); return err }},
		{"remove of a missing key", rpcs("Remove"), "not found", errdefs.IsNotFound,
			func(ctx context.Context) error { return sn.Remove(ctx, "missing") }},
		{"update of a missing key", rpcs("Update"), "not found", errdefs.IsNotFound,
			func(ctx context.Context) error {
				_, err := sn.Update(ctx, snapshots.Info{Name: "missing"})
				return err
			}},
		{"prepare over a missing parent", rpcs("Prepare"), "not found", errdefs.IsNotFound,
			func(ctx context.Context) error {
				_, err := sn.Prepare(ctx, "orphan", "missing")
				return err
			}},
		{"prepare of an existing key", rpcs("Prepare"), "already exists",
			errdefs.IsAlreadyExists, func(ctx context.Context) error {
				_, err := sn.Prepare(ctx, "top-active", "")
				return err
			}},
		{"view under a committed name", rpcs("View"), "already exists",
			errdefs.IsAlreadyExists, func(ctx context.Context) error {
				_, err := sn.View(ctx, "mid", "base")
				return err
			}},
		{"commit to an existing name", rpcs("Commit"), "already exists",
			errdefs.IsAlreadyExists,
			func(ctx context.Context) error { return sn.Commit(ctx, "base", "top-active") }},
		{"prepare over an active parent", rpcs("Prepare"), "invalid argument",
			errdefs.IsInvalidArgument, func(ctx context.Context) error {
				_, err := sn.Prepare(ctx, "over-active", "top-active")
				return err
			}},
		{"commit of a view", rpcs("Commit"), "failed precondition",
			errdefs.IsFailedPrecondition,
			func(ctx context.Context) error { return sn.Commit(ctx, "from-view", "view-1") }},
		{"mounts of a committed snapshot", rpcs("Mounts"), "failed precondition",
			errdefs.IsFailedPrecondition,
			func(ctx context.Context) error { _, err := sn.Mounts(ctx, "base"); return err }},
		{"remove of a parent with children", rpcs("Remove"), "failed precondition",
			errdefs.IsFailedPrecondition,
			func(ctx context.Context) error { return sn.Remove(ctx, "base") }},
		{"update of an immutable field", rpcs("Update"), "invalid argument",
			errdefs.IsInvalidArgument, func(ctx context.Context) error {
				_, err := sn.Update(ctx, snapshots.Info{Name: "base", Parent: "mid"}, "parent")
				return err
			}},
		{"walk with a malformed filter", rpcs("List"), filterErr.name, filterErr.is,
			func(ctx context.Context) error {
				_, err := walkNames(sn, "kind=view")
				return err
			}},
		{"walk with a filter missing its value", rpcs("List"), filterErr.name, filterErr.is,
			func(ctx context.Context) error {
				_, err := walkNames(sn, "kind==")
				return err
			}},
	}
	for _, ec := range errorCases {
		ec := ec
		c.check(ec.name+" is "+ec.kind, ec.rpcs, func() error {
			ctx, cancel := call()
			defer cancel()
			return wantErr(ec.do(ctx), ec.kind, ec.is)
		})
	}
	c.check("failed calls changed nothing", rpcs("List", "Stat"), func() error {
		names, err := walkNames(sn)
		if err != nil {
			return err
		}
		if err := sameNames(names, "base", "mid", "top-active", "view-1", "view-2"); err != nil {
			return err
		}
		ctx, cancel := call()
		defer cancel()
		info, err := sn.Stat(ctx, "top-active")
		if err != nil {
			return err
		}
		return infoIs(info, "top-active", snapshots.KindActive, "mid",
			map[string]string{"role": "top"})
	})

	c.check("remove views and an active, children first", rpcs("Remove", "Stat"), func() error {
		ctx, cancel := call()
		defer cancel()
		for _, key := range []string{"view-2", "view-1", "top-active"} {
			if err := sn.Remove(ctx, key); err != nil {
				return fmt.Errorf("remove %s: %w", key, err)
			}
			if _, err := sn.Stat(ctx, key); !errdefs.IsNotFound(err) {
				return fmt.Errorf("%s still there after remove: %v", key, err)
			}
		}
		return nil
	})
	c.check("cleanup through the proxy's snapshots.Cleaner", rpcs("Cleanup"), func() error {
		cleaner, ok := sn.(snapshots.Cleaner)
		if !ok {
			return errors.New("containerd's proxy snapshotter is no snapshots.Cleaner")
		}
		ctx, cancel := call()
		defer cancel()
		return cleaner.Cleanup(ctx)
	})
	c.check("what is left after cleanup still works", rpcs("Prepare", "Stat"), func() error {
		ctx, cancel := call()
		defer cancel()
		if _, err := sn.Prepare(ctx, "final", "mid",
			snapshots.WithLabels(map[string]string{"left": "by snapclient"})); err != nil {
			return err
		}
		info, err := sn.Stat(ctx, "final")
		if err != nil {
			return err
		}
		return infoIs(info, "final", snapshots.KindActive, "mid",
			map[string]string{"left": "by snapclient"})
	})
}

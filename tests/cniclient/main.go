// cnitool: a small CNI client on Debian's libcni, for coil's integration
// tests and benchmarks. It drives plugins the way a container runtime does.
//
//	cnitool add|del|check|status|version CONFLIST [NETNS CONTAINER_ID IFNAME K8S_NAMESPACE K8S_POD]
//	cnitool bench CONFLIST NETNS_LIST_FILE PARALLEL
//	cnitool churn CONFLIST NETNS_LIST_FILE PARALLEL
//
// CNI_PATH (colon separated) is where plugins are looked up; CNI_CACHE_DIR is
// libcni's result cache (default: $TMPDIR/cnitool-cache).
//
// Written against libcni v1.1.2 (golang-github-appc-cni-dev 1.1.2-1), which
// has neither GCNetworkList nor GetStatusNetworkList: "status" therefore
// execs each plugin with CNI_COMMAND=STATUS itself, as libcni >= 1.2 does.
// Note that libcni v1.1.2 parses results up to cniVersion 1.0.0 only.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

const usage = `usage:
  cnitool add|del|check|status|version CONFLIST [NETNS CONTAINER_ID IFNAME K8S_NAMESPACE K8S_POD]
  cnitool bench CONFLIST NETNS_LIST_FILE PARALLEL
  cnitool churn CONFLIST NETNS_LIST_FILE PARALLEL
environment: CNI_PATH (plugin directories, colon separated), CNI_CACHE_DIR
`

// errorJSON is how every error is printed: the plugin's CNI error object,
// or code 999 (types.ErrInternal) for failures on the client side.
type errorJSON struct {
	Code    uint   `json:"code"`
	Msg     string `json:"msg"`
	Details string `json:"details"`
}

func toErrorJSON(err error) errorJSON {
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		return errorJSON{Code: cniErr.Code, Msg: cniErr.Msg, Details: cniErr.Details}
	}
	return errorJSON{Code: types.ErrInternal, Msg: err.Error()}
}

type pod struct {
	netns, containerID, ifName, namespace, name string
}

func (p pod) runtimeConf() *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: p.containerID,
		NetNS:       p.netns,
		IfName:      p.ifName,
		Args: p.args(),
	}
}

// args: what kubelet/containerd pass in CNI_ARGS. An empty namespace leaves
// K8S_POD_NAMESPACE out, as podman and nerdctl do.
func (p pod) args() [][2]string {
	args := [][2]string{{"IgnoreUnknown", "1"}}
	if p.namespace != "" {
		args = append(args, [2]string{"K8S_POD_NAMESPACE", p.namespace})
	}
	return append(args, [2]string{"K8S_POD_NAME", p.name},
		[2]string{"K8S_POD_INFRA_CONTAINER_ID", p.containerID})
}

func podFromArgs(args []string) pod {
	p := pod{containerID: "cnitool", ifName: "eth0", namespace: "default", name: "cnitool"}
	fields := []*string{&p.netns, &p.containerID, &p.ifName, &p.namespace, &p.name}
	for i, a := range args {
		if i < len(fields) {
			*fields[i] = a
		}
	}
	return p
}

func loadConfList(path string) (*libcni.NetworkConfigList, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(data, &probe); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if _, ok := probe["plugins"]; ok {
		return libcni.ConfListFromBytes(data)
	}
	conf, err := libcni.ConfFromBytes(data) // a single-plugin .conf
	if err != nil {
		return nil, err
	}
	return libcni.ConfListFromConf(conf)
}

func newCNI() *libcni.CNIConfig {
	var path []string
	for _, dir := range filepath.SplitList(os.Getenv("CNI_PATH")) {
		if dir != "" {
			path = append(path, dir)
		}
	}
	cacheDir := os.Getenv("CNI_CACHE_DIR")
	if cacheDir == "" {
		cacheDir = filepath.Join(os.TempDir(), "cnitool-cache")
	}
	return libcni.NewCNIConfigWithCacheDir(path, cacheDir, nil)
}

func printJSON(v interface{}) {
	out, err := json.Marshal(v)
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(append(out, '\n'))
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "cnitool: %v\n", err)
	printJSON(toErrorJSON(err))
	os.Exit(1)
}

// status runs CNI_COMMAND=STATUS on every plugin of the list (CNI 1.1.0).
func status(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
	if gte, err := version.GreaterThanOrEqualTo(list.CNIVersion, "1.1.0"); err != nil {
		return err
	} else if !gte {
		fmt.Fprintf(os.Stderr, "cnitool: cniVersion %s has no STATUS; nothing to do\n", list.CNIVersion)
		return nil
	}
	for _, plugin := range list.Plugins {
		pluginPath, err := invoke.FindInPath(plugin.Network.Type, cni.Path)
		if err != nil {
			return err
		}
		conf, err := libcni.InjectConf(plugin, map[string]interface{}{
			"name": list.Name, "cniVersion": list.CNIVersion})
		if err != nil {
			return err
		}
		args := &invoke.Args{Command: "STATUS", Path: strings.Join(cni.Path, ":")}
		if err := invoke.ExecPluginWithoutResult(ctx, pluginPath, conf.Bytes, args, nil); err != nil {
			return fmt.Errorf("plugin type=%q failed (status): %w", plugin.Network.Type, err)
		}
	}
	return nil
}

func versions(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList) ([]map[string]interface{}, error) {
	var out []map[string]interface{}
	for _, plugin := range list.Plugins {
		info, err := cni.GetVersionInfo(ctx, plugin.Network.Type)
		if err != nil {
			return nil, fmt.Errorf("plugin type=%q failed (version): %w", plugin.Network.Type, err)
		}
		var buf strings.Builder
		if err := info.Encode(&buf); err != nil {
			return nil, err
		}
		entry := map[string]interface{}{}
		if err := json.Unmarshal([]byte(buf.String()), &entry); err != nil {
			return nil, err
		}
		entry["type"] = plugin.Network.Type
		out = append(out, entry)
	}
	return out, nil
}

func readPods(path string) ([]pod, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var pods []pod
	scanner := bufio.NewScanner(f)
	for n := 1; scanner.Scan(); n++ {
		line := strings.TrimSpace(scanner.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) != 5 {
			return nil, fmt.Errorf("%s:%d: want 5 fields "+
				"(netns_path container_id ifname k8s_namespace k8s_pod), got %d", path, n, len(fields))
		}
		pods = append(pods, podFromArgs(fields))
	}
	return pods, scanner.Err()
}

type benchError struct {
	Op          string    `json:"op"`
	ContainerID string    `json:"container_id"`
	Error       errorJSON `json:"error"`
}

// runPhase calls op for every pod, at most parallel at once; it returns
// the per-call times (ms, in file order), the wall time and the errors.
func runPhase(name string, pods []pod, parallel int, op func(pod) error) ([]float64, float64, []benchError) {
	ms := make([]float64, len(pods))
	errs := make([]error, len(pods))
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range pods {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			t0 := time.Now()
			errs[i] = op(pods[i])
			ms[i] = float64(time.Since(t0).Microseconds()) / 1000
		}(i)
	}
	wg.Wait()
	wall := time.Since(start).Seconds()
	var out []benchError
	for i, err := range errs {
		if err != nil {
			out = append(out, benchError{Op: name, ContainerID: pods[i].containerID, Error: toErrorJSON(err)})
		}
	}
	return ms, wall, out
}

func bench(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList, args []string) int {
	pods, err := readPods(args[0])
	if err != nil {
		fail(err)
	}
	parallel, err := strconv.Atoi(args[1])
	if err != nil || parallel < 1 {
		fail(fmt.Errorf("PARALLEL must be a positive integer, not %q", args[1]))
	}
	addMs, addWall, addErrs := runPhase("add", pods, parallel, func(p pod) error {
		_, err := cni.AddNetworkList(ctx, list, p.runtimeConf())
		return err
	})
	delMs, delWall, delErrs := runPhase("del", pods, parallel, func(p pod) error {
		return cni.DelNetworkList(ctx, list, p.runtimeConf())
	})
	errs := append(append([]benchError{}, addErrs...), delErrs...)
	printJSON(map[string]interface{}{
		"add_ms": addMs, "del_ms": delMs,
		"add_wall_s": addWall, "del_wall_s": delWall,
		"errors": errs,
	})
	if len(errs) > 0 {
		return 1
	}
	return 0
}

// churn is pod churn: PARALLEL workers, worker w takes the pods of lines
// w, w+PARALLEL, w+2*PARALLEL, ... in order and does ADD then DEL for each
// before it starts the next (so a pod listed with worker w's namespace is
// never used by two calls at once). Reports per-call times and the wall
// time of the whole run.
func churn(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList, args []string) int {
	pods, err := readPods(args[0])
	if err != nil {
		fail(err)
	}
	parallel, err := strconv.Atoi(args[1])
	if err != nil || parallel < 1 {
		fail(fmt.Errorf("PARALLEL must be a positive integer, not %q", args[1]))
	}
	addMs := make([]float64, len(pods))
	delMs := make([]float64, len(pods))
	errs := make([][]benchError, parallel)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < parallel; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < len(pods); i += parallel {
				p := pods[i]
				t0 := time.Now()
				_, err := cni.AddNetworkList(ctx, list, p.runtimeConf())
				addMs[i] = float64(time.Since(t0).Microseconds()) / 1000
				if err != nil {
					errs[w] = append(errs[w], benchError{Op: "add", ContainerID: p.containerID, Error: toErrorJSON(err)})
				}
				t0 = time.Now()
				err = cni.DelNetworkList(ctx, list, p.runtimeConf())
				delMs[i] = float64(time.Since(t0).Microseconds()) / 1000
				if err != nil {
					errs[w] = append(errs[w], benchError{Op: "del", ContainerID: p.containerID, Error: toErrorJSON(err)})
				}
			}
		}(w)
	}
	wg.Wait()
	wall := time.Since(start).Seconds()
	all := []benchError{}
	for _, e := range errs {
		all = append(all, e...)
	}
	printJSON(map[string]interface{}{
		"add_ms": addMs, "del_ms": delMs, "wall_s": wall, "errors": all,
	})
	if len(all) > 0 {
		return 1
	}
	return 0
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	cmd, rest := os.Args[1], os.Args[3:]
	list, err := loadConfList(os.Args[2])
	if err != nil {
		fail(err)
	}
	ctx := context.Background()
	cni := newCNI()

	switch cmd {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, podFromArgs(rest).runtimeConf())
		if err != nil {
			fail(err)
		}
		if err := result.PrintTo(os.Stdout); err != nil {
			fail(err)
		}
		os.Stdout.Write([]byte("\n"))
	case "del":
		if err := cni.DelNetworkList(ctx, list, podFromArgs(rest).runtimeConf()); err != nil {
			fail(err)
		}
	case "check":
		if err := cni.CheckNetworkList(ctx, list, podFromArgs(rest).runtimeConf()); err != nil {
			fail(err)
		}
	case "status":
		if err := status(ctx, cni, list); err != nil {
			fail(err)
		}
	case "version":
		info, err := versions(ctx, cni, list)
		if err != nil {
			fail(err)
		}
		printJSON(info)
	case "bench":
		if len(rest) != 2 {
			fmt.Fprint(os.Stderr, usage)
			os.Exit(2)
		}
		os.Exit(bench(ctx, cni, list, rest))
	case "churn":
		if len(rest) != 2 {
			fmt.Fprint(os.Stderr, usage)
			os.Exit(2)
		}
		os.Exit(churn(ctx, cni, list, rest))
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
}

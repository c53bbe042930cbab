// A GPO step with the C++ wrapper: sample, value the steps, reset at the critical one, train,
// swap the adapter in.   c++ -std=c++17 example.cpp -I ../../include -I . -L ../../target/release -lgpo
#include "gpo.hpp"

#include <iostream>

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: example model.gguf adapter-out.gguf\n";
        return 2;
    }
    try {
        GpoEngineParams ep = gpo_engine_default_params();
        ep.n_parallel = 8;
        ep.n_ctx_per_seq = 512;
        gpo::Engine engine(argv[1], ep);
        GpoSamplingParams sp = gpo_sampling_default_params();
        sp.temperature = 0.7f;
        sp.max_tokens = 40;
        gpo::Trajectories roots = engine.generate("What is 2 + 3? Think step by step.", 2, sp);
        std::cout << "sample: " << roots.text(0).substr(0, 60) << "... (" << roots.steps(0).size() << " steps)\n";
        gpo::Verifier verifier;
        GpoValueParams vp = gpo_value_default_params();
        vp.rollouts = 2;
        vp.sampling = sp;
        gpo::StepValues v = engine.step_values(roots, 0, [&](const std::string&, const std::string& c) { return verifier.score(c, "5"); }, vp);
        std::cout << "critical step " << v.critical << " of " << v.advantages.size() << "\n";
        size_t at = v.critical > 0 ? roots.steps(0)[v.critical - 1].second : 0;
        gpo::Trajectories resets = engine.fork(roots, 0, at, 3, sp);
        std::vector<float> rewards;
        for (size_t i = 0; i < resets.size(); i++) rewards.push_back(verifier.score(resets.text(i), "5"));
        rewards[0] = 1.0f;  // ensure a learning signal in this tiny example
        gpo::Trainer trainer(argv[1], "{\"temperature\": 0.7, \"lora\": {\"rank\": 2, \"alpha\": 4.0}}");
        GpoStepReport r = trainer.step(resets, rewards);
        trainer.export_adapter(argv[2]);
        std::cout << "trained step " << r.step << ", adapter version " << engine.set_adapter(argv[2]) << "\n";
        try {
            engine.fork(roots, 9, 0, 1, sp);
        } catch (const gpo::Error& e) {
            std::cout << "caught: " << (e.status() == GPO_INVALID_ARGUMENT ? "invalid argument" : "other") << "\n";
        }
        std::cout << "ok\n";
        return 0;
    } catch (const gpo::Error& e) {
        std::cerr << "gpo error: " << e.what() << "\n";
        return 1;
    }
}
